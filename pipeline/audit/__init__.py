"""Data audit: suspected label errors and near-duplicate images, found on extract's cached features."""
