"""dlib's 128-D face recognition network, readable and differentiable in torch.

dlib's ``dlib_face_recognition_resnet_model_v1.dat`` (shipped offline by
face_recognition_models) is read with a pure-Python parser, rebuilt as a torch module, and
fed aligned chips cut like ``dlib.get_face_chip``, so a face decoder can use dlib's
embedding as an identity loss (gradients flow back to the input pixels).

- ``weights``: where dlib's model files are, and dlib's own (C++) models loaded once.
- ``file_format``: the parser of dlib's binary serialisation -> ``ParsedNet``.
- ``network``: ``DlibFaceNet``, the forward pass in torch, and ``load_dlib_face_net``.
- ``chips``: ``extract_face_chips``, a differentiable, batched ``dlib.get_face_chip``.
"""
