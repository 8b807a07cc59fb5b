"""Detection: COCO mAP (metrics); the task, models and export are to come (issue 20)."""
