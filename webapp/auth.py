"""Accounts: sign up, sign in (JWT access tokens), and who is asking."""

from __future__ import annotations

from bson import ObjectId
from flask import current_app
from flask.views import MethodView
from flask_jwt_extended import create_access_token, create_refresh_token, current_user, jwt_required
from flask_smorest import abort
from flask_smorest.error_handler import ErrorSchema
from mongoengine import NotUniqueError

from models import User
from models import user as users
from webapp.extensions import Blueprint, jwt, passwords
from webapp.schemas import SigninSchema, SignupSchema, TokenSchema, UserSchema

blp = Blueprint("auth", __name__, url_prefix="/auth", description="Accounts and access tokens")
THROTTLED = "too many attempts from this address, or failed ones for this account; wait Retry-After seconds"
BUSY = "every password-hashing slot of the server is busy; retry after Retry-After seconds"


@jwt.token_verification_loader
def _names_an_account(header: dict, data: dict) -> bool:
    # Only tokens this API issued reach here (the signature holds), but one signed with a leaked or
    # shared secret may name anything: a subject that cannot be an account id is an invalid token.
    return ObjectId.is_valid(data["sub"])


@jwt.user_lookup_loader
def _load_user(header: dict, data: dict) -> User | None:
    return User.objects(id=data["sub"]).first()


@jwt.user_identity_loader
def _identity(user: User) -> str:
    return str(user.id)


@blp.route("/signup")
class Signup(MethodView):
    @blp.arguments(SignupSchema)
    @blp.response(201, UserSchema)
    @blp.alt_response(409, schema=ErrorSchema, description="the username or email is taken, whatever its case")
    @blp.alt_response(429, schema=ErrorSchema, description=THROTTLED)
    @blp.alt_response(503, schema=ErrorSchema, description=BUSY)
    def post(self, data: dict):
        """Create an account."""
        _refuse_taken(data)
        user = User(username=data["username"], email=data["email"], password_hash=passwords().hash(data["password"]))
        try:
            user.save()
        except NotUniqueError:
            # Another sign-up with the same name won the race between the check and the insert.
            _refuse_taken(data)
            abort(409, message="that username or email is already taken")
        return user


def _refuse_taken(data: dict) -> None:
    taken = users.taken(data["username"], data["email"])
    if taken:
        abort(409, message=f"that {' and '.join(taken)} {'is' if len(taken) == 1 else 'are'} already taken "
                           "(names and emails are compared regardless of case)",
              errors={field: ["already taken"] for field in taken})


@blp.route("/signin")
class Signin(MethodView):
    @blp.arguments(SigninSchema)
    @blp.response(200, TokenSchema)
    @blp.alt_response(401, schema=ErrorSchema, description="wrong email or password")
    @blp.alt_response(429, schema=ErrorSchema, description=THROTTLED)
    @blp.alt_response(503, schema=ErrorSchema, description=BUSY)
    def post(self, data: dict):
        """Exchange an email and password for an access token."""
        user = users.by_email(data["email"])
        if user is None:
            passwords().dummy_check(data["password"])
            abort(401, message="wrong email or password")
        if not passwords().check(data["password"], user.password_hash):
            abort(401, message="wrong email or password")
        return {**_access(user), "refresh_token": create_refresh_token(identity=user),
                "refresh_expires_in": int(current_app.config["JWT_REFRESH_TOKEN_EXPIRES"].total_seconds())}


@blp.route("/refresh")
class Refresh(MethodView):
    @jwt_required(refresh=True)
    @blp.response(200, TokenSchema)
    @blp.alt_response(401, schema=ErrorSchema, description="no refresh token, or it expired: sign in again")
    @blp.doc(security=[{"bearerAuth": []}])
    def post(self):
        """A new access token for the refresh token sign-in gave (sent as `Authorization: Bearer <refresh>`):
        a session longer than an access token's life is followed to its end without signing in again."""
        return _access(current_user)


def _access(user: User) -> dict:
    return {"access_token": create_access_token(identity=user), "token_type": "bearer", "username": user.username,
            "expires_in": int(current_app.config["JWT_ACCESS_TOKEN_EXPIRES"].total_seconds())}

