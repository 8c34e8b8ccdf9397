"""Metrics shared by the tasks: FROC (Camelyon16), Dice (MONAI conventions), confusion-matrix mIoU."""
