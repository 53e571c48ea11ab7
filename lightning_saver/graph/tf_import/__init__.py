"""Import a TensorFlow MetaGraph (and its checkpoint) into runnable, trainable PyTorch."""
