"""Training the face decoder and the voice encoder."""
