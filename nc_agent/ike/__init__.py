"""IKEv2 keying through strongSwan's charon, driven over VICI (issue 6)."""
