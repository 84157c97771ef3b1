"""Image preparation: decoding, input layouts and the `prepare images` job."""
