"""The HH-RLHF preference-file loader: JSONL(.gz) lines -> (prompt, chosen, rejected), every bad
line one DataError naming the file, the line and the field."""
import gzip
import json
import os
import sys
import zlib


class DataError(ValueError):
    """Bad input file: the message names the file, the line and the field."""


def _split_dialogue(chosen, rejected):
    """HH-RLHF pairs are dialogues that agree up to some '\\n\\nAssistant:' turn: the prompt is
    their common text up to the last such marker, the responses are the rest of each (occasionally
    several turns long)."""
    marker = "\n\nAssistant:"
    common = os.path.commonprefix([chosen, rejected])
    cut = common.rfind(marker)
    if cut < 0:
        return None
    cut += len(marker)
    return chosen[:cut], chosen[cut:], rejected[cut:]


def read_bytes(path):
    """The file's bytes, gunzipped if it is named .gz; a bad file is one DataError naming it.
    A .gz is read whole first, so that its checksum is verified before any line is blamed for
    bad UTF-8 or JSON."""
    try:
        if not str(path).endswith(".gz"):
            with open(path, "rb") as f:
                return f.read()
        with gzip.open(path, "rb") as f:
            return f.read()
    except EOFError:
        raise DataError(f"{path}: truncated gzip file (it ends mid-stream)") from None
    except gzip.BadGzipFile as e:
        raise DataError(f"{path}: not a valid gzip file ({e})") from None
    except zlib.error as e:
        raise DataError(f"{path}: corrupt gzip data ({e})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None


def load_hh_pairs(path):
    """[(prompt, chosen, rejected)] from a JSONL file (optionally .gz) of HH-RLHF dialogues
    {"chosen", "rejected"}, or of {"prompt", "chosen", "rejected"} with the responses apart from
    the prompt (TRL's format). Any bad line raises DataError naming the file, line number and field.
    Pairs whose two responses are the same text teach nothing: they are dropped with a warning, and
    a file of nothing else is an error."""
    pairs, same = [], 0
    for lineno, raw in enumerate(read_bytes(path).splitlines(), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}:{lineno}: invalid UTF-8 at byte {e.start}") from None
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object")
        for field in ("chosen", "rejected") + (("prompt",) if "prompt" in row else ()):
            if field not in row:
                raise DataError(f"{path}:{lineno}: missing field '{field}'")
            if not isinstance(row[field], str):
                raise DataError(f"{path}:{lineno}: field '{field}' must be a string, "
                                f"got {type(row[field]).__name__}")
        split = ((row["prompt"], row["chosen"], row["rejected"]) if "prompt" in row
                 else _split_dialogue(row["chosen"], row["rejected"]))
        if split is None:
            raise DataError(f"{path}:{lineno}: field 'chosen': no '\\n\\nAssistant:' turn "
                            "shared with 'rejected'")
        if split[1] == split[2]:
            same += 1
            continue
        pairs.append(split)
    if not pairs:
        raise DataError(f"{path}: no usable preference pairs"
                        + (f" (all {same} have chosen == rejected)" if same else " (empty file)"))
    if same:
        print(f"warning: {path}: dropped {same} pairs whose chosen and rejected responses "
              "are identical", file=sys.stderr)
    return pairs
