"""Loading: ``create_loader``, gather threads and their tuner."""
