"""Where dlib's model files are (face_recognition_models ships them offline) and dlib's
own (C++) models, loaded once per process."""

from __future__ import annotations

import functools


def model_paths() -> dict[str, str]:
    """Files of the dlib models that ship with face_recognition_models (offline)."""
    import warnings

    with warnings.catch_warnings():
        # face_recognition_models imports pkg_resources, deprecated in new setuptools.
        warnings.simplefilter("ignore")
        import face_recognition_models as models
    return {
        "landmarks68": models.pose_predictor_model_location(),
        "cnn_detector": models.cnn_face_detector_model_location(),
        "resnet128": models.face_recognition_model_location(),
    }


@functools.lru_cache(maxsize=None)
def load_dlib_model(name: str):
    """dlib models, loaded once per process (about 0.5 s each) and shared by analyzers."""
    import dlib

    if name == "hog":
        return dlib.get_frontal_face_detector()
    paths = model_paths()
    if name == "cnn":
        return dlib.cnn_face_detection_model_v1(paths["cnn_detector"])
    if name == "landmarks68":
        return dlib.shape_predictor(paths["landmarks68"])
    if name == "resnet128":
        return dlib.face_recognition_model_v1(paths["resnet128"])
    raise KeyError(name)
