"""``speech2face`` command line.

    speech2face predict VOICE -o face.png
    speech2face predict talk.mp4 -o face.png --encoder runs:/<run id>/model --decoder models/face_decoder.pt
    speech2face serve                      # a local web page: http://127.0.0.1:7860

Models default to the pipeline's outputs (``models/voice_encoder.pt``,
``models/face_decoder.pt`` under the current folder). ``--encoder``/``--decoder`` take a
path or an MLflow artifact URI (``runs:/<run id>/model``, ``models:/<name>/<version>``,
read from the project's MLflow store or ``MLFLOW_TRACKING_URI``). An artifact folder is
searched for its ``.pt`` file; a URI of the ``.pt`` file itself also fetches the ``.json``
beside it (the model's shape and spectrogram settings live there).

Every expected failure (missing or unreadable recording, no audio, silence, missing or
broken model files, unknown MLflow run, unwritable output) ends with one ``Error: ...`` line
on stderr and exit status 1, never a traceback.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import click

from speech2face.core.params import ParamsError

if TYPE_CHECKING:
    from speech2face.data.audio import SpectrogramSettings
    from speech2face.models.face_decoder import FaceDecoder
    from speech2face.models.voice_encoder import VoiceEncoder

# torch (and MLflow) are imported only where needed: `--help` and the errors about a missing
# recording answer at once instead of after seconds of start-up.

DEFAULT_ENCODER = "models/voice_encoder.pt"
DEFAULT_DECODER = "models/face_decoder.pt"
# "runs:/", "models:/", "file:///", "s3://"...: a scheme of two or more letters before ":/"
# (one letter would be a Windows drive, which is a path).
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:/")
MODEL_URI_SCHEMES = ("runs:/", "models:/")


def first_line(error: BaseException, limit: int = 300) -> str:
    """The first informative line of an error, at most ``limit`` characters: torch's
    load_state_dict opens with a generic "Error(s) in loading state_dict for ...:" and names
    the mismatch on the next line; an empty message gives the exception's type name."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Error(s) in loading state_dict"):
        lines = lines[1:]
    line = lines[0] if lines else type(error).__name__
    return line if len(line) <= limit else line[:limit - 3] + "..."


def is_uri(location: str) -> bool:
    return bool(_URI.match(location))


def missing_sqlite_store(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` tracking URI when it does not exist (MLflow would
    create an empty store there, with its migrations' log lines, only to report the run
    missing); None otherwise."""
    if not uri.startswith("sqlite:///"):
        return None
    database = uri[len("sqlite:///"):].split("?", 1)[0]
    if not database or database == ":memory:":
        return None
    return None if Path(database).exists() else Path(database)


@contextlib.contextmanager
def quiet_mlflow() -> Iterator[None]:
    """No progress bars or INFO lines from MLflow on the command's stderr."""
    from speech2face.core.tracking import quiet_artifacts

    logger = logging.getLogger("mlflow")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with quiet_artifacts():
            yield
    finally:
        logger.setLevel(level)


def resolve_model(location: str, stem: str, workdir: Path) -> Path:
    """A local .pt path; MLflow URIs (runs:/, models:/ only) are downloaded into ``workdir`` first."""
    if not is_uri(location):
        return Path(location)
    if not location.startswith(MODEL_URI_SCHEMES):
        raise click.ClickException(f"{location}: expected a path, runs:/<run id>/... or models:/<name>/... "
                                   f"(other URI schemes are refused)")
    from speech2face.core import tracking

    uri = tracking.tracking_uri()
    absent = missing_sqlite_store(uri)
    if absent is not None:
        raise click.ClickException(f"cannot fetch {location}: no MLflow store at {absent} "
                                   f"(set MLFLOW_TRACKING_URI to the store that holds the run)")
    with quiet_mlflow():
        import mlflow

        destination = workdir / stem
        # Set globally as well as passed: MLflow resolves models:/ URIs with the global
        # registry URI (which follows the tracking URI unless MLFLOW_REGISTRY_URI is set)
        # whatever download_artifacts is given.
        mlflow.set_tracking_uri(uri)
        stores = {"tracking_uri": uri, "registry_uri": mlflow.get_registry_uri()}
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=location, dst_path=str(destination),
                                                             **stores))
        except Exception as error:  # MlflowException, OSError, ...: unknown run, no such artifact
            raise click.ClickException(f"cannot fetch {location} from MLflow: {first_line(error)}") from None
        if local.is_file() and local.suffix == ".pt":
            # The shape (and the encoder's spectrogram settings) are in the .json beside the
            # weights: fetch it too, or loading would report the model missing.
            with contextlib.suppress(Exception):
                mlflow.artifacts.download_artifacts(artifact_uri=location[:-len(".pt")] + ".json",
                                                    dst_path=str(destination), **stores)
    found = [local] if local.suffix == ".pt" else sorted(local.rglob("*.pt"))
    if not found:
        raise click.ClickException(f"{location} holds no .pt model file")
    return found[0]


def spectrogram_settings(encoder_path: Path) -> SpectrogramSettings:
    """The settings the encoder was trained with (stored beside it), else params.yaml's, else
    the defaults. ``ParamsError`` names the file the bad value came from."""
    from speech2face.data.audio import SpectrogramSettings
    from speech2face.models.encoder_io import encoder_meta

    source = encoder_path.with_suffix(".json")
    stored = encoder_meta(encoder_path).get("spectrogram")
    if not stored and Path("params.yaml").exists():
        import yaml

        source = Path("params.yaml")
        stored = (yaml.safe_load(source.read_text()) or {}).get("spectrogram")
    fields = SpectrogramSettings.__dataclass_fields__
    try:
        return SpectrogramSettings(**{k: v for k, v in (stored or {}).items() if k in fields}).validate()
    except (ParamsError, TypeError) as error:  # TypeError: a value of the wrong type, e.g. "6 s"
        # validate() words its messages for params.yaml; say which file it really was
        raise ParamsError(f"{source}: {first_line(error).removeprefix('params.yaml: ')}") from None


def load_models(encoder_path: Path, decoder_path: Path) -> tuple[VoiceEncoder, FaceDecoder, SpectrogramSettings]:
    """(encoder, decoder, spectrogram settings); ClickException with one line on any failure."""
    from speech2face.core.model_files import ModelFileError
    from speech2face.models.encoder_io import load_encoder
    from speech2face.models.face_decoder import load_decoder
    from speech2face.models.voice_head import front_end_preprocess, is_voice_head, load_voice_head
    from speech2face.voice_to_face import VoiceHeadSettings

    # The files are the user's: anything can be wrong with them (missing, not a torch file,
    # a .json without a key, weights of another shape), and each is one line, not a traceback.
    if is_voice_head(encoder_path):   # GE2E + head (train_voice_head): its own front end
        try:
            head, decoder = load_voice_head(encoder_path), load_decoder(decoder_path)
        except ModelFileError as error:
            raise click.ClickException(first_line(error)) from None
        if decoder.in_dim != head.out_dim:
            raise click.ClickException(f"the voice head gives {head.out_dim}-D features, the face decoder takes "
                                       f"{decoder.in_dim}-D ones: they are not a pair")
        return head, decoder, VoiceHeadSettings(preprocess=front_end_preprocess(encoder_path))
    try:
        encoder = load_encoder(encoder_path)
        decoder = load_decoder(decoder_path)
    except ModelFileError as error:
        raise click.ClickException(first_line(error)) from None
    try:
        settings = spectrogram_settings(encoder_path)
    except (ParamsError, ValueError) as error:  # ValueError: params.yaml that is not YAML
        raise click.ClickException(f"spectrogram settings of the voice encoder: {first_line(error)}") from None
    if encoder.n_freq != settings.n_freqs:
        raise click.ClickException(f"voice encoder {encoder_path} expects {encoder.n_freq} frequencies, its "
                                   f"spectrogram settings give {settings.n_freqs}")
    if decoder.in_dim != encoder.out_dim:
        raise click.ClickException(f"the voice encoder gives {encoder.out_dim}-D features, the face decoder "
                                   f"takes {decoder.in_dim}-D ones: they are not a pair")
    return encoder, decoder, settings


def write_png(image, output: Path) -> None:
    """Atomic write (never a half-written PNG), with the permissions of an ordinary new file."""
    from PIL import Image

    from speech2face.core.fsutil import atomic_path

    umask = os.umask(0)
    os.umask(umask)
    if output.parent.exists() and not output.parent.is_dir():
        raise click.ClickException(f"cannot write {output}: {output.parent} is not a folder")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(output) as tmp:
            Image.fromarray(image).save(tmp, format="PNG")
            # mkstemp makes the temporary file 0600; the PNG is for the user to share
            os.chmod(tmp, 0o666 & ~umask)
    except OSError as error:
        raise click.ClickException(f"cannot write {output}: {error.strerror or first_line(error)}") from None


@click.group()
def main() -> None:
    """Speech2Face: a face from a voice."""


@main.command()
@click.argument("voice", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=Path("face.png"),
              show_default=True, help="PNG to write")
@click.option("--encoder", default=DEFAULT_ENCODER, show_default=True,
              help="voice encoder (Table-1, or the GE2E voice head models/voice_head.pt): path or MLflow URI")
@click.option("--decoder", default=DEFAULT_DECODER, show_default=True, help="face decoder: path or MLflow URI")
@click.option("--max-windows", default=8, show_default=True, type=click.IntRange(min=1),
              help="most spectrogram windows averaged for a long recording")
@click.option("--max-seconds", default=600.0, show_default=True, type=click.FloatRange(min=0.1),
              help="only this much of the recording is decoded and used (bounded memory)")
def predict(voice: Path, output: Path, encoder: str, decoder: str, max_windows: int, max_seconds: float) -> None:
    """Write the face predicted from the voice in VOICE (any audio or video file)."""
    if not voice.is_file():
        raise click.ClickException(f"{voice}: no such file")
    from .voice_to_face import VoiceError, predict_face

    with tempfile.TemporaryDirectory() as workdir:
        encoder_path = resolve_model(encoder, "encoder", Path(workdir))
        decoder_path = resolve_model(decoder, "decoder", Path(workdir))
        voice_encoder, face_decoder, settings = load_models(encoder_path, decoder_path)
    try:
        prediction = predict_face(voice, voice_encoder, face_decoder, settings, max_windows=max_windows,
                                  max_seconds=max_seconds)
    except VoiceError as error:
        raise click.ClickException(str(error)) from None
    write_png(prediction.image, output)
    click.echo(f"speech2face: {voice} ({prediction.seconds:.1f} s, {prediction.windows} window"
               f"{'s' if prediction.windows > 1 else ''}) -> {output}")


@main.command()
@click.option("--encoder", default=DEFAULT_ENCODER, show_default=True,
              help="voice encoder (Table-1, or the GE2E voice head models/voice_head.pt): path or MLflow URI")
@click.option("--decoder", default=DEFAULT_DECODER, show_default=True, help="face decoder: path or MLflow URI")
@click.option("--faces", default=Path("data/faces"), show_default=True, type=click.Path(file_okay=False, path_type=Path),
              help="faces folder of the pipeline: its test split is the gallery of nearest faces")
@click.option("--host", default="127.0.0.1", show_default=True, help="address to listen on (this machine only)")
@click.option("--port", default=7860, show_default=True, type=click.IntRange(0, 65535))
@click.option("--max-seconds", default=600.0, show_default=True, type=click.FloatRange(min=0.1),
              help="only this much of an uploaded recording is decoded and used")
def serve(encoder: str, decoder: str, faces: Path, host: str, port: int, max_seconds: float) -> None:
    """A local web page: upload or record a voice, see the predicted face and the nearest test faces."""
    import uvicorn

    from .serve import FaceService, create_app, load_gallery

    with tempfile.TemporaryDirectory() as workdir:
        encoder_path = resolve_model(encoder, "encoder", Path(workdir))
        decoder_path = resolve_model(decoder, "decoder", Path(workdir))
        voice_encoder, face_decoder, settings = load_models(encoder_path, decoder_path)
    gallery = load_gallery(faces)
    service = FaceService(voice_encoder, face_decoder, settings, {"encoder": encoder, "decoder": decoder}, gallery,
                          max_seconds=max_seconds)
    where = (f"{len(gallery.identities)} test identities from {faces}" if gallery is not None else
             f"no test gallery ({faces}/index.csv absent: run the pipeline first)")
    click.echo(f"speech2face: serving http://{host}:{port}  (models: {encoder}, {decoder}; {where}); Ctrl-C stops")
    uvicorn.run(create_app(service), host=host, port=port, log_level="warning")


if __name__ == "__main__":
    main()
