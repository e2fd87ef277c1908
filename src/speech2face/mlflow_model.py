"""The voice encoder and face decoder of one pipeline run as one MLflow model (pyfunc).

Logged by the evaluate stage from this file ("models from code": MLflow stores the code, not
a pickle) with the ``models/`` folder as its artifact, and registered as a version of the
model ``speech2face`` carrying its R@K as tags. Use:

    model = mlflow.pyfunc.load_model("models:/speech2face/<version>")
    faces = model.predict(["talk.flac"])          # one (224, 224, 3) uint8 image per recording
"""

from __future__ import annotations

from pathlib import Path

import mlflow.models
import mlflow.pyfunc


class VoiceToFace(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from speech2face.cli import load_models

        folder = Path(context.artifacts["models"])
        self.encoder, self.decoder, self.settings = load_models(folder / "voice_encoder.pt",
                                                                folder / "face_decoder.pt")

    def predict(self, context, model_input: list[str], params=None) -> list:
        """One face image ((224, 224, 3) uint8) per recording path."""
        from speech2face.voice_to_face import predict_face

        return [predict_face(path, self.encoder, self.decoder, self.settings).image for path in model_input]


mlflow.models.set_model(VoiceToFace())
