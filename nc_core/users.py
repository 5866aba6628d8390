"""Local user accounts: ietf-system's /system/authentication/user (RFC 7317).

Users live in the server's own running datastore, like every other piece of
configuration: name, password as an iana-crypt-hash, authorized SSH keys; the
NACM groups they belong to are in /nacm/groups (RFC 8341).  Passwords are
checked with the C library's crypt(3) (libcrypt), which implements every
hash iana-crypt-hash allows; a '$0$' clear-text password written by a client
is replaced by a SHA-512 crypt hash before it is stored (RFC 7317 Section 3.3
'$0$' handling).
"""

from __future__ import annotations

import base64
import ctypes
import ctypes.util
import hmac
import secrets
import string
from dataclasses import dataclass, field

from lxml import etree

from nc_core.xmlutil import NACM_NS, SYS_NS, default_ns_element, qn

_SALT_CHARS = string.ascii_letters + string.digits + "./"


def _libcrypt() -> ctypes.CDLL:
    # libcrypt's soname first: find_library starts ldconfig (a process) at every import.
    try:
        lib = ctypes.CDLL("libcrypt.so.1")
    except OSError:
        lib = ctypes.CDLL(ctypes.util.find_library("crypt") or "libcrypt.so")
    lib.crypt.restype = ctypes.c_char_p
    lib.crypt.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    return lib


_CRYPT = _libcrypt()


def crypt(password: str, setting: str) -> str | None:
    """crypt(3): the hash of ``password`` under ``setting`` (a full hash works as a setting)."""
    out = _CRYPT.crypt(password.encode(), setting.encode())
    if out is None or out.startswith(b"*"):
        return None
    return str(out.decode())


def hash_password(password: str) -> str:
    """A SHA-512 crypt ('$6$') hash with a 16-character random salt."""
    salt = "".join(secrets.choice(_SALT_CHARS) for _ in range(16))
    hashed = crypt(password, f"$6${salt}$")
    if hashed is None:  # pragma: no cover - glibc always supports $6$
        raise RuntimeError("libcrypt does not support SHA-512 crypt")
    return hashed


def check_password(password: str, stored: str) -> bool:
    if stored.startswith("$0$"):
        return hmac.compare_digest(stored[3:].encode(), password.encode())
    hashed = crypt(password, stored)
    return hashed is not None and hmac.compare_digest(hashed.encode(), stored.encode())


@dataclass(frozen=True)
class AuthorizedKey:
    name: str
    algorithm: str
    key_data: bytes


@dataclass
class User:
    name: str
    password: str | None = None
    keys: list[AuthorizedKey] = field(default_factory=list)


def users_from(running: etree._Element) -> dict[str, User]:
    """The accounts configured in a running datastore tree."""
    users: dict[str, User] = {}
    auth = running.find(f"{qn(SYS_NS, 'system')}/{qn(SYS_NS, 'authentication')}")
    if auth is None:
        return users
    for entry in auth.iterfind(qn(SYS_NS, "user")):
        name = entry.findtext(qn(SYS_NS, "name"))
        if not name:
            continue
        user = User(name.strip(), entry.findtext(qn(SYS_NS, "password")))
        for key in entry.iterfind(qn(SYS_NS, "authorized-key")):
            try:
                data = base64.b64decode(key.findtext(qn(SYS_NS, "key-data")) or "", validate=True)
            except ValueError:
                continue
            user.keys.append(
                AuthorizedKey(
                    (key.findtext(qn(SYS_NS, "name")) or "").strip(),
                    (key.findtext(qn(SYS_NS, "algorithm")) or "").strip(),
                    data,
                )
            )
        users[user.name] = user
    return users


def has_clear_text_passwords(root: etree._Element) -> bool:
    """Whether a datastore tree holds a '$0$' password (:func:`hash_clear_text_passwords`
    would change it)."""
    return any(pw.text and pw.text.startswith("$0$") for pw in root.iter(qn(SYS_NS, "password")))


def hash_clear_text_passwords(root: etree._Element) -> bool:
    """Replace '$0$' passwords in a datastore tree by hashes; True if any was replaced."""
    changed = False
    for pw in root.iter(qn(SYS_NS, "password")):
        if pw.text and pw.text.startswith("$0$"):
            pw.text = hash_password(pw.text[3:])
            changed = True
    return changed


def add_user(
    root: etree._Element,
    name: str,
    *,
    password: str | None,
    public_keys: list[str],
    groups: list[str],
) -> None:
    """Add or update an account in a datastore tree (the `adduser` command)."""
    system = _child(root, qn(SYS_NS, "system"), nsmap={None: SYS_NS})
    auth = _child(system, qn(SYS_NS, "authentication"))
    user = None
    for entry in auth.iterfind(qn(SYS_NS, "user")):
        if (entry.findtext(qn(SYS_NS, "name")) or "").strip() == name:
            user = entry
    if user is None:
        user = etree.SubElement(auth, qn(SYS_NS, "user"))
        etree.SubElement(user, qn(SYS_NS, "name")).text = name
    if password is not None:
        pw = _child(user, qn(SYS_NS, "password"))
        pw.text = hash_password(password)
    existing = {
        k.findtext(qn(SYS_NS, "key-data")) for k in user.iterfind(qn(SYS_NS, "authorized-key"))
    }
    for line in public_keys:
        parts = line.split()
        if len(parts) < 2:
            raise ValueError(f"not an OpenSSH public key line: {line[:40]!r}")
        algorithm, data = parts[0], parts[1]
        base64.b64decode(data, validate=True)
        if data in existing:
            continue
        key = etree.SubElement(user, qn(SYS_NS, "authorized-key"))
        taken = {
            k.findtext(qn(SYS_NS, "name")) for k in user.iterfind(qn(SYS_NS, "authorized-key"))
        }
        index = 1
        while f"key-{index}" in taken:
            index += 1
        etree.SubElement(key, qn(SYS_NS, "name")).text = (
            parts[2] if len(parts) > 2 and parts[2] not in taken else f"key-{index}"
        )
        etree.SubElement(key, qn(SYS_NS, "algorithm")).text = algorithm
        etree.SubElement(key, qn(SYS_NS, "key-data")).text = data
        existing.add(data)
    if groups:
        nacm = _child(root, qn(NACM_NS, "nacm"), nsmap={None: NACM_NS})
        groups_elem = _child(nacm, qn(NACM_NS, "groups"))
        for group_name in groups:
            group = None
            for entry in groups_elem.iterfind(qn(NACM_NS, "group")):
                if (entry.findtext(qn(NACM_NS, "name")) or "").strip() == group_name:
                    group = entry
            if group is None:
                group = etree.SubElement(groups_elem, qn(NACM_NS, "group"))
                etree.SubElement(group, qn(NACM_NS, "name")).text = group_name
            members = {(u.text or "").strip() for u in group.iterfind(qn(NACM_NS, "user-name"))}
            if name not in members:
                etree.SubElement(group, qn(NACM_NS, "user-name")).text = name


def replace_user(
    root: etree._Element, name: str, public_keys: list[str], groups: list[str]
) -> None:
    """The account ``name`` with exactly these keys (no password): re-enrolment replaces
    the keys an account had instead of adding to them."""
    for user in list(root.iter(qn(SYS_NS, "user"))):
        if (user.findtext(qn(SYS_NS, "name")) or "").strip() == name:
            parent = user.getparent()
            assert parent is not None
            parent.remove(user)
    add_user(root, name, password=None, public_keys=public_keys, groups=groups)


def _child(
    parent: etree._Element, tag: str, nsmap: dict[str | None, str] | None = None
) -> etree._Element:
    found = parent.find(tag)
    if found is None:
        found = etree.SubElement(parent, tag, nsmap=nsmap)  # type: ignore[arg-type]
    return found


def initial_nacm() -> etree._Element:
    """The NACM configuration of a fresh state directory: group 'admin' may do anything.

    Other groups get RFC 8341's defaults (read permitted except default-deny-all
    nodes, write denied, exec permitted except default-deny-all operations).
    """
    nacm = default_ns_element(NACM_NS, "nacm")
    rule_list = etree.SubElement(nacm, qn(NACM_NS, "rule-list"))
    etree.SubElement(rule_list, qn(NACM_NS, "name")).text = "admin"
    etree.SubElement(rule_list, qn(NACM_NS, "group")).text = "admin"
    rule = etree.SubElement(rule_list, qn(NACM_NS, "rule"))
    etree.SubElement(rule, qn(NACM_NS, "name")).text = "permit-all"
    etree.SubElement(rule, qn(NACM_NS, "module-name")).text = "*"
    etree.SubElement(rule, qn(NACM_NS, "access-operations")).text = "*"
    etree.SubElement(rule, qn(NACM_NS, "action")).text = "permit"
    etree.SubElement(
        rule, qn(NACM_NS, "comment")
    ).text = "Members of group admin have full access, keys included."
    return nacm
