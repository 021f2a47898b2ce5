"""What every gRPC side shares -- the gateway, the workers and the transfer service: servers,
channels with credentials, the error -> status table, and protobuf <-> contract conversion.
No service logic, and no torch or engine imports (the gateway uses this package)."""
