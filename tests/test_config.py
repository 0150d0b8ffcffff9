from __future__ import annotations

import pytest

from greylist.config import ConfigError, load, parse_duration, split_flags


@pytest.mark.parametrize("text,seconds", [("60", 60), ("90s", 90), ("5m", 300), ("2h", 7200),
                                          ("1.5d", 129600), ("1w", 604800), (" 1D ", 86400)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "abc", "-5", "nan", "inf", "5x", "1e999"])
def test_bad_durations(text):
    with pytest.raises(ConfigError):
        parse_duration(text)


def test_environment_overrides_run_script_flags():
    """tcprules sets variables per netblock: the specific beats the general."""
    flags, program = split_flags(["--delay", "300", "--store=memory://", "qmail-smtpd", "--delay", "1"])
    assert program == ["qmail-smtpd", "--delay", "1"]
    assert load(flags, {}).delay == 300
    assert load(flags, {"GREYLIST_DELAY": "30"}).delay == 30
    assert load(flags, {"GREYLIST_DELAY": "30"}).store == "memory://"


def test_errors_name_their_source():
    with pytest.raises(ConfigError, match="GREYLIST_DELAY"):
        load({}, {"GREYLIST_DELAY": "soon"})
    with pytest.raises(ConfigError, match="--on-error"):
        load({"on_error": "maybe"}, {})
    with pytest.raises(ConfigError, match="unknown option"):
        split_flags(["--dealy", "5", "prog"])
    with pytest.raises(ConfigError, match="needs a value"):
        split_flags(["--delay"])
    with pytest.raises(ConfigError, match="retry window"):
        load({"delay": "3d"}, {})


def test_boolean_flag_and_double_dash():
    flags, program = split_flags(["--enhanced-codes", "--", "--weird-program"])
    assert load(flags, {}).enhanced is True
    assert program == ["--weird-program"]
    assert load(flags, {"GREYLIST_ENHANCED": "no"}).enhanced is False


def test_reply_texts_are_printable_ascii_and_paths_need_only_be_one_line():
    """A control character in GREYLIST_MESSAGE would go out in every 4xx reply (found by
    the plugin's hypothesis suite: E451 with a 0x1f in it)."""
    for bad in ("\x1f", "wait\r\n250 ok", "caf\u00e9", "come back\tlater"):
        with pytest.raises(ConfigError, match="printable ASCII"):
            load({"message": bad}, {})
    assert load({"message": "come back later"}, {}).message == "come back later"
    assert load({"whitelist": "/etc/gr\u00fcn/clients"}, {}).whitelist == "/etc/gr\u00fcn/clients"
    with pytest.raises(ConfigError, match="CR, LF or NUL"):
        load({"whitelist": "/etc/a\nb"}, {})
