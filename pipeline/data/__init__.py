"""Images in: decoding, folder scan and validation, splits, augmentation, the shapes data set."""
