"""Accounts."""

from __future__ import annotations

from mongoengine import DateTimeField, Document, EmailField, NotUniqueError, StringField, ValidationError

from models.db import utcnow


class User(Document):
    """A person who signs in and runs sessions; the password is kept only as a bcrypt hash."""

    username = StringField(required=True, unique=True, min_length=3, max_length=40)
    # The name as compared: `CaseUser` and `caseuser` are one account. The unique index on it is what
    # refuses the second, even when two sign-ups race; sparse, so that accounts stored before this field
    # existed still load (add_missing_keys gives them theirs).
    username_key = StringField(unique=True, sparse=True)
    # Always stored lower-cased (clean), so its unique index refuses `Ann@x.com` beside `ann@x.com`.
    email = EmailField(required=True, unique=True)
    password_hash = StringField(required=True)
    created_at = DateTimeField(default=utcnow)

    meta = {"collection": "users"}

    def clean(self) -> None:
        """Derive the compared forms, so that every writer stores them alike."""
        if self.username:
            self.username_key = fold(self.username)
        if self.email:
            self.email = fold(self.email)


def fold(text: str) -> str:
    """The form names and emails are compared in."""
    return text.lower()


def email_error(address: str) -> str | None:
    """Why `address` cannot be stored as an account's email, or None when it can."""
    try:
        User.email.validate(address)
    except ValidationError:
        local = address.rpartition("@")[0]
        if not local.isascii():
            return ("use an address written in ASCII before the @ (an internationalised domain after it "
                    "is fine); this server cannot store other mailbox names")
        return "use an address of the form name@example.com"
    return None


def taken(username: str, email: str) -> list[str]:
    """Which of `username` and `email` an account already has, compared regardless of case."""
    found = []
    if User.objects(username_key=fold(username)).first() is not None:
        found.append("username")
    if User.objects(email=fold(email)).first() is not None:
        found.append("email")
    return found


def by_email(email: str) -> User | None:
    """The account signing in with `email`, whatever its case."""
    return User.objects(email=fold(email)).first()


def add_missing_keys() -> list[str]:
    """Give accounts stored before `username_key` existed theirs; returns the names that clash with another
    account's regardless of case (those keep working, the clash stays for an operator to settle)."""
    clashes = []
    for user in User.objects(username_key__exists=False).only("id", "username"):
        try:
            User.objects(id=user.id, username_key__exists=False).update_one(set__username_key=fold(user.username))
        except NotUniqueError:
            clashes.append(user.username)
    return clashes
