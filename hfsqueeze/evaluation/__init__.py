"""Measuring a model (`measure`), the one table of metrics (`metrics`) and the `CompressionReport` (`report`)."""
