"""Face data: RecordIO, image folders, .bin pairs, the landmark cache and training augmentation."""
