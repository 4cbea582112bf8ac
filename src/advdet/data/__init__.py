"""The data layer: COCO/VOC readers, the COCO writer, letterbox, and the synthetic shapes benchmark."""
