"""Write / evict / retrieve rules beside the authors': the training-free memory of the demo model."""
