import os

from greylist.adapters.hostname import smtp_hostname


def test_configured_name_then_control_me_then_the_machine(tmp_path):
    me = tmp_path / "me"
    assert smtp_hostname("mx.configured", str(me)) == "mx.configured"
    me.write_text("mail.example.com\nsecond line\n")
    assert smtp_hostname("", str(me)) == "mail.example.com"
    me.write_text("bad name with spaces\n")
    assert smtp_hostname("", str(me)) == os.uname().nodename
    assert smtp_hostname("", str(tmp_path / "missing")) == os.uname().nodename
