"""Bundle reference parsing: every valid form, and errors that name the valid forms."""

import pytest

from slotserve.bundles.manifest import BundleError
from slotserve.bundles.ref import Ref, parse_ref

HEX = "ab12cd34" * 8


@pytest.mark.parametrize("text, expected, kind", [
    ("support-bot:3", Ref(name="support-bot", version=3), "version"),
    ("a:1", Ref(name="a", version=1), "version"),
    ("m.v2_x-y:12", Ref(name="m.v2_x-y", version=12), "version"),
    ("support-bot@live", Ref(name="support-bot", alias="live"), "alias"),
    ("bot@previous", Ref(name="bot", alias="previous"), "alias"),
    ("bot@candidate", Ref(name="bot", alias="candidate"), "alias"),
    ("bot@my-custom.alias", Ref(name="bot", alias="my-custom.alias"), "alias"),
    ("support-bot", Ref(name="support-bot"), "latest"),
    ("0bot", Ref(name="0bot"), "latest"),
    ("sha256:ab12cd", Ref(digest_prefix="ab12cd"), "digest"),
    ("sha256:AB12CD", Ref(digest_prefix="ab12cd"), "digest"),
    (f"sha256:{HEX}", Ref(digest_prefix=HEX), "digest"),
    ("  bot:2 ", Ref(name="bot", version=2), "version"),
])
def test_valid_refs(text, expected, kind):
    ref = parse_ref(text)
    assert ref == expected
    assert ref.kind == kind
    assert parse_ref(str(ref)) == ref  # str() is a canonical, re-parseable form


@pytest.mark.parametrize("text", [
    "", " ", "Bot:1", "bot:0", "bot:-1", "bot:1.5", "bot:", ":1", "bot:v1", "bot@", "@live", "bot@Live",
    "bot@live@x", "bot:1:2", "sha256:", "sha256:ab12c", "sha256:xyz123", f"sha256:{HEX}0", "-bot", "_bot",
    ".bot", "bot name", "bot/1", "b" * 129, "bot:١", None, 3,
])
def test_invalid_refs_name_valid_forms(text):
    with pytest.raises(BundleError) as err:
        parse_ref(text)
    msg = str(err.value)
    assert "invalid bundle reference" in msg
    assert ("NAME:VERSION" in msg and "sha256:" in msg) or "hex digits" in msg


def test_parse_ref_accepts_a_ref():
    r = Ref(name="x", version=1)
    assert parse_ref(r) is r


def test_bundle_error_is_value_error():
    assert issubclass(BundleError, ValueError)
