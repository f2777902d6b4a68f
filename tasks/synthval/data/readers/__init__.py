"""One reader per dataset format (Perception 0.0.1, SOLO, COCO, GroceriesReal), each into a `RawIndex`."""
