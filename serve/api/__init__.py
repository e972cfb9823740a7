"""The HTTP edge: the FastAPI routes (`routes`), the OpenAI and admin request/response
shapes (`requests`, `responses`, `errors`), one request's path without HTTP (`handler`)
and the admin token (`auth`). Pydantic lives here and nowhere deeper.

Nothing is imported here: the admin CLI reads `slotserve.api.auth` without paying for
FastAPI, torch or the replica."""
