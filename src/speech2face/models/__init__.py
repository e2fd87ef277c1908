"""The networks: voice encoder, face decoder (with its warp), losses, dlib's face network."""
