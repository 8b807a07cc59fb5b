"""Detection: COCO mAP (metrics), the detection data sets by name (data: coco, cifar10_det;
which task a run is follows from them), torchvision detectors at CPU size (models), and the
task object the engine is to call (task: loss, evaluate, core). Training through train.py,
the config groups and export are to come (issue 20)."""
