"""The definitions every layer shares, each written once: error kinds, finish reasons, the
sampling fields, limits and the block hash. Standard library only, so that the engine, the
transfer service, the workers and the torch-free gateway can all import it."""
