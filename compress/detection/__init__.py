"""Detection: COCO mAP (metrics), torchvision detectors at CPU size (models), and the task
object the engine is to call (task: loss, evaluate, core). Training through train.py, the
config groups and export are to come (issue 20)."""
