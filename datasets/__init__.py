"""Image sources (folder with the ADM crop, scikit-learn digits), autoencoders, and the HDF5 latent cache."""
