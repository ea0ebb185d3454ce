"""Convert datasets as distributed into FFCV files: DIR/train.beton, DIR/test.beton, DIR/meta.json."""
