"""Data: TFDS builders for the AMD-135M corpora, packing, and a deterministic per-host loader."""
