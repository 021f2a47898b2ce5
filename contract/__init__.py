"""The definitions every layer shares, each written once: error kinds, finish reasons, the
sampling fields, limits, the block hash and the bounds of the histograms workers report.
Standard library only, so that the engine, the transfer service, the workers and the
torch-free gateway can all import it."""
