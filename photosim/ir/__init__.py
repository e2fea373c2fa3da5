"""The integer model: its file format, the op table, integer ranges, the fake-quant reference, summaries."""
