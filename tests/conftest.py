"""Fixtures shared by several test modules."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_torch_thread():
    """oneDNN convolutions on 2 threads slow down 10-50x when another process holds a core
    (measured on this project's shared 2-core machines); one thread is steady. Modules that
    time or train torch networks use it with ``pytest.mark.usefixtures("one_torch_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _dlib_descriptor(image, landmarks):
    """dlib's own C++ descriptor (float64) of ``image`` from the given 68 landmarks, rounded
    to the integer points dlib keeps; the face box is the whole image."""
    import dlib
    import numpy as np

    from speech2face.models.dlib.weights import load_dlib_model

    points = dlib.points()
    for x, y in landmarks:
        points.append(dlib.point(int(round(float(x))), int(round(float(y)))))
    height, width = image.shape[:2]
    shape = dlib.full_object_detection(dlib.rectangle(0, 0, width - 1, height - 1), points)
    return np.asarray(load_dlib_model("resnet128").compute_face_descriptor(image, shape), np.float64)


@pytest.fixture(scope="session")
def dlib_descriptor():
    """The reference embedding tests compare the torch replica and the backends with."""
    pytest.importorskip("dlib")
    return _dlib_descriptor
