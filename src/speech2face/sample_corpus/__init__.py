"""Synthetic talking-head corpus (a test and demo fixture, not used by the stages).

- identities: random streams, latents, YouTube-like ids, face and voice parameters
- portraits: base portraits, landmark morphing, the identity's cut-out head
- scene: backgrounds, the person on a canvas, camera motion, frame rendering, HOG face checks
- speech: espeak-ng voices, sentences, soundtracks with segments
- video: a planned video, its CSV rows, bit-exact mp4 muxing
- corpus: the corpus builder, bad rows, CSV files and ``generate``
"""
