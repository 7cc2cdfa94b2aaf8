"""Detection fine-tuning with detectron2: one runner for every benchmark (VOC, COCO); `runner` has the map."""
