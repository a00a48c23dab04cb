"""The plugin contract is written once, in the Plugin protocol: `check_plugin` refuses a class that
lacks any required member of it, and accepts one without the optional members."""

import inspect

import pytest

from inspector import plugin as contract
from inspector.errors import PluginError
from plugins.dfkde.plugin import DfkdePlugin

REQUIRED = sorted(name for name in vars(contract.Plugin)
                  if not name.startswith("_") and name not in contract.OPTIONAL_MEMBERS
                  and (inspect.isfunction(vars(contract.Plugin)[name])
                       or isinstance(vars(contract.Plugin)[name], (classmethod, property))))


def without(member: str) -> type:
    """DfkdePlugin with `member` removed (shadowed by a non-callable attribute)."""
    return type("Partial", (DfkdePlugin,), {member: None})


def test_the_protocol_names_what_the_worker_and_tools_call():
    assert {"create", "load", "min_images", "describe", "prepare", "fit", "score", "calibrate", "save"} <= set(REQUIRED)
    assert "decode_size" in vars(contract.Plugin) and "decode_size" not in REQUIRED


@pytest.mark.parametrize("member", REQUIRED)
def test_a_plugin_missing_a_member_of_the_protocol_is_refused_by_name(member):
    with pytest.raises(PluginError, match=f"`{member}`"):
        contract.check_plugin("dfkde", without(member))


def test_a_classmethod_of_the_protocol_must_stay_a_classmethod():
    broken = type("Partial", (DfkdePlugin,), {"load": lambda self, folder, device: None})
    with pytest.raises(PluginError, match="`load` must be a classmethod"):
        contract.check_plugin("dfkde", broken)


def test_optional_members_may_be_left_out():
    assert contract.check_plugin("dfkde", without("decode_size")) is not None
    assert contract.decode_size(object()) is None
