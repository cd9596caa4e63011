"""argparse `type=` checks shared by the commands: a bad value is a usage error (exit status
2, no traceback), reported before the command does any work. Limits that depend on a model
(`check_model_limits`) are checked as soon as the model is loaded, before any long work."""
import argparse
import os
from pathlib import Path
from typing import Callable, Optional, Tuple


def positive_int(text: str) -> int:
    """An int >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def int_in(low: int, high: Optional[int] = None) -> Callable[[str], int]:
    """An int in low..high (no upper bound for None)."""
    expected = f"an integer in {low}..{high}" if high is not None else f"an integer >= {low}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
        return value

    parse.__name__ = "int"  # argparse names the type in its messages
    return parse


# tokens per answer, the start token included: at least it and one more
max_len = int_in(2)


def image_shape(text: str) -> Tuple[int, int]:
    """HEIGHTxWIDTH, both positive."""
    try:
        height, width = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH, e.g. 128x512, got {text!r}") from None
    if height < 1 or width < 1:
        raise argparse.ArgumentTypeError(f"expected a positive height and width, got {text!r}")
    return height, width


def device(text: str) -> str:
    """A torch device that exists here: cpu, or cuda[:n] with a GPU n."""
    import torch

    try:
        parsed = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected cpu or cuda[:n], got {text!r}") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: CUDA is not available here")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r}: there are {torch.cuda.device_count()} CUDA device(s)")
    elif parsed.type != "cpu":
        raise argparse.ArgumentTypeError(f"expected cpu or cuda[:n], got {text!r}")
    return text


def output_path(text: str) -> Path:
    """A file that can be written (its missing parent folders are made then), or an existing
    folder that can be written into."""
    path = Path(text)
    if path.is_dir():
        folder = path
    else:
        if path.exists() and not os.access(path, os.W_OK):
            raise argparse.ArgumentTypeError(f"cannot write {text!r}")
        folder = path.parent
        while not folder.exists():
            folder = folder.parent
        if not folder.is_dir():
            raise argparse.ArgumentTypeError(f"cannot write {text!r}: {str(folder)!r} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: folder {str(folder)!r} is not writable")
    return path


def output_file(text: str) -> Path:
    """A file to write, in a folder that exists and is writable (an existing file is replaced;
    a folder is refused)."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a folder, expected a file name")
    if path.exists() and not os.access(path, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot write {text!r}")
    folder = path.parent
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: folder {str(folder)!r} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: folder {str(folder)!r} is not writable")
    return path


def output_folder(text: str) -> Path:
    """A folder to write files into: an existing writable one, or one that can be made (its
    missing parents too); a file is refused."""
    path = Path(text)
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r}: {str(existing)!r} is a file, expected a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot write into {text!r}: folder {str(existing)!r} is not writable")
    return path


def input_file(text: str) -> Path:
    """An existing file that can be read."""
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{text!r}: no such file")
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text!r} is not a file")
    if not os.access(path, os.R_OK):
        raise argparse.ArgumentTypeError(f"{text!r}: cannot read it")
    return path


def result_file(text: str) -> Path:
    """A readable benchmark result file of fastcomer.benchmarking's schema."""
    from ..benchmarking import load_report

    path = input_file(text)
    try:
        load_report(path)
    except (ValueError, OSError, KeyError, TypeError) as err:
        raise argparse.ArgumentTypeError(f"not a result file: {err}") from None
    return path


def check_model_limits(parser: argparse.ArgumentParser, model, max_len: Optional[int] = None,
                       beam_size: Optional[int] = None, beam_option: str = "--beam-size") -> None:
    """The limits a loaded model sets (`SearchOptions.check_model`'s): --max-len <= its
    positions, beam <= vocab/2; a usage error otherwise."""
    positions = model.decoder.pos_enc.pe.shape[0]
    if max_len is not None and not 2 <= max_len <= positions:
        parser.error(f"--max-len must be in 2..{positions}, got {max_len}")
    if beam_size is not None and 2 * beam_size > model.config.vocab_size:
        parser.error(f"{beam_option} must be at most {model.config.vocab_size // 2}, got {beam_size}")


def load_checkpoint(parser: argparse.ArgumentParser, path, device: str = "cpu"):
    """`load_comer(path)`, a usage error naming --checkpoint when it cannot be."""
    from ..checkpoint import CheckpointError, load_comer

    try:
        return load_comer(path, map_location=device)
    except (CheckpointError, OSError) as err:
        parser.error(f"--checkpoint: {err}")


def port_number(text: str) -> int:
    """A TCP port, 0..65535 (0: any free port)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number in 0..65535, got {value}")
    return value


def positive_seconds(text: str) -> float:
    """A finite number of seconds > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value
