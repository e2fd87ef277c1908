"""The data stages: AVSpeech rows -> clips -> audio + frames -> spectrograms, faces, splits."""
