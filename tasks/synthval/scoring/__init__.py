"""How good detections are: COCO evaluation (the only IoU and TP/FP matching), bootstrap intervals, and the
protocol that says when two numbers are comparable."""
