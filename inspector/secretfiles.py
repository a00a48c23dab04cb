"""Secrets from files, the way orchestrators hand them over: a variable `NAME_FILE` names a file whose
content is the value of `NAME` (Docker and compose secrets under /run/secrets, a Kubernetes Secret
mounted as a volume, systemd's LoadCredential=). A file keeps the secret out of the process environment,
which `docker inspect`, `/proc/PID/environ` and crash reports show.

Read once where the settings are built (`inspector.config.load`) or a client is made, never on import.
Only secrets have a file form: another `INSPECTOR_*_FILE` variable is an error that names the ones that do.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from inspector.errors import ConfigError

FILE_SUFFIX = "_FILE"
MAX_SECRET_BYTES = 64 * 1024  # a password or key is far smaller; a path to a large file is a mistake
SECRET_SETTINGS = (("broker", "password"),)  # the settings that are secrets: loc in the settings tree
# boto3 reads AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN from the environment but has no
# file form of them (only AWS_SHARED_CREDENTIALS_FILE, a whole INI file): these are read here.
AWS_SECRET_VARIABLES = {"AWS_ACCESS_KEY_ID": "aws_access_key_id", "AWS_SECRET_ACCESS_KEY": "aws_secret_access_key",
                        "AWS_SESSION_TOKEN": "aws_session_token"}


def read_secret(variable: str, path: str) -> str:
    """The secret in the file `variable` names: its text with one trailing newline removed (what `echo` and
    editors add), never empty. Errors name the variable, never the content."""
    file = Path(path)
    try:
        if file.stat().st_size > MAX_SECRET_BYTES:
            raise ConfigError(f"{variable}={path}: over {MAX_SECRET_BYTES // 1024} KiB, not a secret; name the "
                              "file that holds only the secret")
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{variable}={path}: no such file; mount the secret there or correct the path") from None
    except IsADirectoryError:
        raise ConfigError(f"{variable}={path}: a folder; name the file in it that holds the secret") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{variable}={path}: not UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(f"{variable}={path}: cannot be read ({exc.strerror}); check its owner and mode") from None
    text = text.removesuffix("\n").removesuffix("\r")
    if not text:
        raise ConfigError(f"{variable}={path}: the file is empty; write the secret in it")
    return text


def _variable(prefix: str, delimiter: str, loc: tuple[str, ...]) -> str:
    return (prefix + delimiter.join(loc)).upper()


def setting_secret_files(environ: Mapping[str, str], prefix: str, delimiter: str) -> dict[tuple[str, ...], str]:
    """{settings loc: secret} from the `<PREFIX><KEY>_FILE` variables set (names matched without regard to
    case, as the settings' own). A secret given both ways, or a file form of a setting that is not a secret,
    is an error."""
    by_name = {name.upper(): value for name, value in environ.items()}
    forms = {_variable(prefix, delimiter, loc) + FILE_SUFFIX: loc for loc in SECRET_SETTINGS}
    for name in by_name:
        if name.startswith(prefix.upper()) and name.endswith(FILE_SUFFIX) and name not in forms:
            raise ConfigError(f"environment variable {name}: only secrets are read from a file ({', '.join(forms)}); "
                              f"set {name.removesuffix(FILE_SUFFIX)} itself")
    found = {}
    for name, loc in forms.items():
        if name not in by_name or by_name[name] == "":
            continue
        plain = name.removesuffix(FILE_SUFFIX)
        if by_name.get(plain):
            raise ConfigError(f"both {plain} and {name} are set; keep one (the file form keeps the secret out of "
                              "the environment)")
        found[loc] = read_secret(name, by_name[name])
    return found


def is_secret_file_variable(name: str, prefix: str, delimiter: str) -> bool:
    """Whether `name` (an environment variable, any case) is the file form of a secret setting."""
    return name.upper() in {_variable(prefix, delimiter, loc) + FILE_SUFFIX for loc in SECRET_SETTINGS}


def aws_credentials(environ: Mapping[str, str]) -> dict[str, str]:
    """boto3 client arguments for the AWS credentials given as files (`AWS_SECRET_ACCESS_KEY_FILE`...);
    empty when none is. A key given both ways is an error. boto3 takes an access key only with its secret,
    so the other half comes from its plain variable where only one is a file."""
    found = {}
    for variable, argument in AWS_SECRET_VARIABLES.items():
        path = environ.get(variable + FILE_SUFFIX)
        if not path:
            continue
        if environ.get(variable):
            raise ConfigError(f"both {variable} and {variable}{FILE_SUFFIX} are set; keep one")
        found[argument] = read_secret(variable + FILE_SUFFIX, path)
    if found:
        for variable, argument in AWS_SECRET_VARIABLES.items():
            if argument not in found and environ.get(variable):
                found[argument] = environ[variable]
        if ("aws_access_key_id" in found) != ("aws_secret_access_key" in found):
            raise ConfigError("AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY go together: set the other one too "
                              "(as a variable or its _FILE form)")
    return found
