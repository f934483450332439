"""Paper figures: one script per figure, reading experiment results."""
