"""`litestar ecard …`: the card office's commands, run against the same database and stores as the service."""

from __future__ import annotations

import asyncio
import secrets
import signal
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import click

from app.db.engine import create_engine
from app.domain.audit.services import Actor
from app.domain.errors import DomainError
from app.domain.imports.services import CHUNKS_IN_FLIGHT, MAX_CHUNKS_IN_FLIGHT
from app.security.keyring import KeyringError, generate_keyring
from app.security.pii import NATIONAL
from app.server.context import ServiceContext
from app.settings import get_settings
from crypto.hsm import HsmConfigurationError

T = TypeVar("T")


def _run(work: Callable[[ServiceContext], Awaitable[T]]) -> T:
    """Run work with a fresh context; print a problem's detail instead of a traceback."""

    async def main() -> T:
        context = ServiceContext.build(get_settings())
        try:
            await context.directory.reload()
            return await work(context)
        finally:
            await context.close()

    try:
        return asyncio.run(main())
    except DomainError as exc:
        raise click.ClickException(exc.detail) from None
    except (KeyringError, HsmConfigurationError) as exc:
        raise click.ClickException(str(exc)) from None


@click.group(name="ecard")
def ecard_group() -> None:
    """eCard card-office commands."""


@ecard_group.group(name="db")
def db_group() -> None:
    """Database schema."""


@db_group.command(name="upgrade")
def db_upgrade() -> None:
    """Apply all pending migrations."""
    from app.db.migrate import upgrade_to_head  # Alembic is heavy and chatty: only here.

    async def main() -> None:
        engine = create_engine(get_settings().database_url)
        try:
            await upgrade_to_head(engine)
        finally:
            await engine.dispose()

    asyncio.run(main())
    click.echo("database is at the latest migration")


@ecard_group.group(name="keys")
def keys_group() -> None:
    """The service's own secrets."""


@keys_group.command(name="generate")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Directory to create the key files in.")
@click.option(
    "--profile", type=click.Choice(["international", "national"]), default="international", show_default=True,
    help="Whose data and index keys: AES-256 + HMAC-SHA256, or SM4 + HMAC-SM3 (and the SM2 trust-list key).",
)  # fmt: skip
@click.option("--add", is_flag=True, help="Add only the profile's own keys to an existing directory.")
def keys_generate(out: Path, profile: str, add: bool) -> None:
    """Write a fresh data key, index key, session key and trust-list key (for production)."""
    try:
        written = generate_keyring(out, profile, add=add)
    except KeyringError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"wrote {', '.join(written)} to {out}; set ECARD_KEYS_DIR={out}")


@keys_group.command(name="rekey-pii")
@click.option("--batch", type=click.IntRange(min=1), default=1000, show_default=True, help="Rows per transaction.")
@click.option("--after", type=click.UUID, default=None, help="Resume after this person id (printed by a stopped run).")
@click.option("--check", is_flag=True, help="Only count the rows not yet in ECARD_CRYPTO_PROFILE's scheme.")
def keys_rekey_pii(batch: int, after: uuid.UUID | None, check: bool) -> None:
    """Re-encrypt personal data and issuer private keys, and recompute blind indexes, for ECARD_CRYPTO_PROFILE.

    Run it with both profiles' data and index keys in ECARD_KEYS_DIR (the dual-index period); it
    exits 1 while rows remain in the other scheme. docs/national-crypto.md has the whole drill.
    """
    from app.domain.cards.rekey import RekeyReport, rekey_pii

    async def progress(report: RekeyReport) -> None:
        click.echo(
            f"persons: {report.persons.scanned} scanned, {report.persons.rewritten} rewritten;"
            f" after {report.last_person}"
        )

    async def work(context: ServiceContext) -> RekeyReport:
        return await rekey_pii(
            context.sessions, context.pii, batch=batch, after=after, write=not check, on_batch=progress
        )

    report = _run(work)
    for name, counts in (("persons", report.persons), ("ecards", report.ecards), ("issuer_keys", report.issuer_keys)):
        click.echo(
            f"{name}: scanned {counts.scanned}, rewritten {counts.rewritten}, "
            f"already {report.target} {counts.current}, changed meanwhile {counts.changed}, "
            f"unreadable {counts.unreadable}, duplicates {counts.duplicates}, "
            f"remaining {counts.remaining}"
        )
    click.echo(f"remaining {report.remaining} rows not in the {report.target} scheme")
    if report.remaining:
        sys.exit(1)


@keys_group.command(name="publish")
@click.argument("region")
@click.option("--algorithm", type=click.Choice(["Ed25519", "SM2"]), default=None, help="Default: the profile's.")
@click.option(
    "--key-store", type=click.Choice(["software", "pkcs11"]), default=None,
    help="Where the key is generated and kept; pkcs11: in the token (default: ECARD_ISSUER_KEY_STORE).",
)  # fmt: skip
def keys_publish(region: str, algorithm: str | None, key_store: str | None) -> None:
    """Step 1 of a rotation: a new issuer key for REGION, published but not signing yet.

    Activate it after ECARD_KEY_PUBLISH_LEAD seconds (POST /v1/operator/regions/REGION/keys/KID/activation).
    """
    from app.domain.issuers.services import publish_key
    from crypto.keys import b64url

    async def work(context: ServiceContext) -> tuple[str, str, str]:
        async with context.sessions() as session:
            row = await publish_key(
                session, context.pii, Actor.command("ecard keys publish"), region,
                algorithm or context.settings.issuer_algorithm, context.key_store, key_store,
            )  # fmt: skip
        await context.directory_changes.announce()
        where = f"in the token {row.key_token!r} as {row.key_label!r}" if row.key_label else "in software"
        return b64url(row.kid), row.algorithm, where

    kid, name, where = _run(work)
    click.echo(f"published {name} key {kid} for region {region}, {where}")


@keys_group.command(name="check")
def keys_check() -> None:
    """Check every active issuer key can sign: a token key is in the token as the database says (public key,
    not extractable, sensitive); exits 1 otherwise. The service runs the same check at start-up."""
    from crypto.hsm import Pkcs11SigningKey
    from crypto.keys import b64url

    async def work(context: ServiceContext) -> list[str]:
        keys = context.directory.keys
        if keys.unavailable:
            raise HsmConfigurationError("; ".join(keys.unavailable.values()))
        await asyncio.to_thread(context.key_store.check, list(keys.signing_keys.values()))
        return [
            f"{region}: {b64url(key.kid)} "
            + (f"in the token, {key.label}" if isinstance(key, Pkcs11SigningKey) else "in software")
            for region, key in sorted(keys.signing_keys.items())
        ]

    for line in _run(work):
        click.echo(line)


@ecard_group.group(name="operator")
def operator_group() -> None:
    """Operator accounts."""


@operator_group.command(name="create")
@click.option("--username", required=True)
@click.option("--role", type=click.Choice(["admin", "card_officer", "verifier_manager", "auditor"]), default="admin")
@click.option("--region", "regions", multiple=True, required=True, help="Region code, or '*' for all; repeatable.")
@click.password_option(help="At least 12 characters; asked for when not given.")
def operator_create(username: str, role: str, regions: tuple[str, ...], password: str) -> None:
    """Create an operator account."""
    from app.domain.operators.services import Role, create_operator

    async def work(context: ServiceContext) -> uuid.UUID:
        async with context.sessions() as session:
            operator = await create_operator(
                session,
                Actor.command("ecard operator create"),
                username=username,
                password=password,
                role=Role(role),
                regions=list(regions),
            )
            return operator.id

    operator_id = _run(work)
    click.echo(f"operator {username} ({role}, regions {', '.join(regions)}) created: {operator_id}")


@ecard_group.group(name="region")
def region_group() -> None:
    """Issuing regions."""


@region_group.command(name="add")
@click.argument("code")
@click.argument("name")
def region_add(code: str, name: str) -> None:
    """Register a region (GB/T 2260 code) and generate its signing key (of ECARD_CRYPTO_PROFILE's algorithm)."""
    from app.domain.regions.services import register_region

    async def work(context: ServiceContext) -> str:
        algorithm = context.settings.issuer_algorithm
        async with context.sessions() as session:
            await register_region(
                session, context.pii, Actor.command("ecard region add"), code, name, algorithm, context.key_store
            )
        await context.directory_changes.announce()
        return algorithm

    algorithm = _run(work)
    click.echo(f"region {code} registered with a fresh {algorithm} signing key ({get_settings().issuer_key_store})")


@ecard_group.group(name="card")
def card_group() -> None:
    """Physical cards and eCards."""


@card_group.command(name="issue")
@click.option("--region", required=True)
@click.option("--citizen-id", required=True, help="18-character citizen identity number.")
@click.option("--name", required=True)
@click.option("--card-number", required=True, help="9 letters or digits.")
def card_issue(region: str, citizen_id: str, name: str, card_number: str) -> None:
    """Issue a card and print its one-time activation code."""
    from app.domain.cards.services import issue_card

    async def work(context: ServiceContext) -> tuple[str, str]:
        async with context.sessions() as session:
            issued = await issue_card(
                session,
                context.pii,
                region=region,
                citizen_id=citizen_id,
                name=name,
                card_number=card_number,
                code_ttl=context.settings.activation_code_ttl,
                actor=Actor.command("ecard card issue"),
            )
            return issued.activation_code, issued.activation_expires_at.isoformat()

    code, expires = _run(work)
    click.echo(f"card {card_number.upper()} issued; activation code {code} (valid until {expires})")


@card_group.command(name="import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, readable=True, path_type=Path))
@click.option("--region", "regions", multiple=True, help="Accept rows of this region only; repeatable. Default: all.")
@click.option("--report", type=click.Path(dir_okay=False, path_type=Path), help="Write rejected rows to this CSV.")
@click.option("--chunk-size", type=click.IntRange(1, 20000), default=10000, show_default=True, help="Rows per commit.")
@click.option(
    "--writers",
    type=click.IntRange(1, MAX_CHUNKS_IN_FLIGHT),
    default=CHUNKS_IN_FLIGHT,
    show_default=True,
    help="Chunks written at once on PostgreSQL, each on its own connection (SQLite: one). More for a "
    "database server with cores to spare.",
)
def card_import(file: Path, regions: tuple[str, ...], report: Path | None, chunk_size: int, writers: int) -> None:
    """Issue persons and physical cards from a CSV file with the header region,citizen_id,name,card_number.

    Each chunk of rows commits as a whole and a rerun creates nothing twice: after a crash, run the same
    command again. Imported eCards get no activation code; issue one per card when handing it over
    (POST /v1/operator/cards/{id}/activation-code).
    """
    from app.domain.imports.services import ImportFileError, ImportResult, import_file, write_rejection_report
    from app.domain.operators.services import check_regions

    size = file.stat().st_size

    async def work(context: ServiceContext) -> ImportResult:
        scope = check_regions(list(regions) or ["*"])
        with click.progressbar(length=size, label="importing", file=sys.stderr) as bar:
            try:
                result = await import_file(
                    context.sessions,
                    context.pii,
                    file,
                    Actor.command("ecard card import"),
                    regions=scope,
                    chunk_rows=chunk_size,
                    on_progress=lambda progress: bar.update(progress.bytes_processed - bar.pos),
                    writers=writers,
                )
            except ImportFileError as exc:
                raise click.ClickException(f"{exc}; the rows before it are imported: fix it and run again") from None
        if report is not None:
            await write_rejection_report(context.sessions, result.job_id, report)
        return result

    result = _run(work)
    done = result.progress
    click.echo(
        f"{done.rows} rows in {result.seconds:.1f} s ({result.rows_per_second:.0f} rows/s): {done.created} created, "
        f"{done.already_present} already present, {done.rejected} rejected (import job {result.job_id})"
    )
    if done.rejected:
        click.echo(f"rejected rows written to {report}" if report else "run again with --report PATH to list them")


@ecard_group.group(name="status")
def status_group() -> None:
    """The card-status mirror in Redis."""


def _progress_printer(label: str, every: float = 2.0) -> Callable[[int, int, float], None]:
    """A callback that prints cards done, rate and ETA to stderr, at most every `every` seconds."""
    last = [0.0]

    def show(done: int, total: int, seconds: float) -> None:
        if seconds - last[0] < every and done < total:
            return
        last[0] = seconds
        rate = done / seconds if seconds > 0 else 0.0
        eta = f"{max(total - done, 0) / rate:,.0f} s" if rate > 0 else "?"
        click.echo(f"{label}: {done:,} of ~{total:,} eCards, {rate:,.0f}/s, ETA {eta}", err=True)

    return show


@status_group.command(name="reconcile")
@click.option("--repair", is_flag=True, help="Set every missing or different mirror entry from the database.")
@click.option("--quiet", is_flag=True, help="No progress lines on stderr.")
def status_reconcile(repair: bool, quiet: bool) -> None:
    """Compare every eCard's state in the database with the status mirror; report (and repair) drift."""
    from sqlalchemy import func, select

    from app.db.models import ECard
    from app.domain.cards.services import reconcile_status_mirror

    async def work(context: ServiceContext) -> str:
        async with context.sessions() as session:
            total = int(await session.scalar(select(func.count()).select_from(ECard)) or 0)
            show = _progress_printer("reconcile")
            started = time.monotonic()
            found = await reconcile_status_mirror(
                session, context.mirror, context.pii, repair=repair, batch=5000,
                on_page=None if quiet else lambda done: show(done, total, time.monotonic() - started),
            )  # fmt: skip
        return (
            f"{found.checked} eCards checked: {found.missing} missing from the mirror, "
            f"{found.different} different, {found.profiles_missing} without their profile, {found.repaired} repaired"
        )

    click.echo(_run(work))


@status_group.command(name="rebuild")
@click.option("--restart", is_flag=True, help="Start from the first eCard, not from the last checkpoint.")
@click.option("--page", default=10_000, show_default=True, help="eCards per page read and per bulk write.")
@click.option("--in-flight", default=3, show_default=True, help="Pages being written to the store at once.")
@click.option("--quiet", is_flag=True, help="No progress lines on stderr.")
def status_rebuild(restart: bool, page: int, in_flight: int, quiet: bool) -> None:
    """Write every eCard to the status mirror (a store that came back empty): resumable, beside the service.

    Writes carry each eCard's version, so changes made meanwhile win. Workers do this by themselves after
    a loss (one at a time, through a lease in the database); this command takes the same lease.
    """
    from app.domain.cards.rebuild import Progress, RebuildBusy, Rebuilder

    if page < 1 or in_flight < 1:
        raise click.BadParameter("--page and --in-flight must be at least 1")
    show = _progress_printer("rebuild")

    def progress(state: Progress) -> None:
        show(state.done - state.resumed_from, state.total - state.resumed_from, state.seconds)

    async def work(context: ServiceContext) -> str:
        rebuilder = Rebuilder(
            context.sessions, context.mirror, context.pii, context.settings.redis_prefix,
            page=page, in_flight=in_flight, on_progress=None if quiet else progress,
        )  # fmt: skip
        try:
            report = await rebuilder.run(restart=restart)
        except RebuildBusy as exc:
            raise click.ClickException(str(exc)) from None
        resumed = f", resumed after {report.resumed_from}" if report.resumed_from else ""
        return (
            f"{report.cards} eCards in the mirror{resumed}: {report.written} written, "
            f"{report.cards - report.resumed_from - report.written} already newer there, "
            f"{report.profiles_sealed} profiles sealed; {report.seconds:.1f} s, {report.rate:,.0f} eCards/s"
        )

    click.echo(_run(work))


@ecard_group.group(name="events")
def events_group() -> None:
    """The verification event stream (Redis) and its drain into the database."""


@events_group.command(name="drain")
@click.option("--once", is_flag=True, help="Stop when the stream is empty instead of waiting for more.")
@click.option("--batch", type=click.IntRange(1, 10_000), default=500, show_default=True, help="Events per commit.")
@click.option(
    "--claim-idle",
    type=click.IntRange(0, None),
    default=30_000,
    show_default=True,
    help="Take over events another drain received but did not acknowledge for this many ms (it died).",
)
def events_drain(once: bool, batch: int, claim_idle: int) -> None:
    """Move verification events from the stream into the database, exactly once each.

    Run one or more (each is a consumer of the same group) beside the web workers. SIGTERM or
    Ctrl-C stops it between batches; an event is acknowledged only after its commit.
    """

    async def work(context: ServiceContext) -> str:
        if not context.settings.redis_url:
            raise click.ClickException("the event stream lives in Redis: set REDIS_URL")
        drain = context.event_drain(batch=batch, claim_idle_ms=claim_idle, block_ms=0 if once else 1000)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        if not once:
            await drain.run(stop)
            return "stopped"
        moved = 0
        while not stop.is_set() and (count := await drain.run_once()):
            moved += count
        backlog = await context.events.backlog()
        return f"{moved} events stored; {backlog.length} left in the stream ({backlog.pending} pending)"

    click.echo(_run(work))


@events_group.command(name="backlog")
def events_backlog() -> None:
    """How many events wait in the stream, and how many of those a drain holds unacknowledged."""

    async def work(context: ServiceContext) -> str:
        backlog = await context.events.backlog()
        return f"{backlog.length} events in the stream, {backlog.pending} pending"

    click.echo(_run(work))


@ecard_group.group(name="catalog")
def catalog_group() -> None:
    """The service catalogue: what the card gives access to, and where."""


@catalog_group.command(name="load")
@click.option(
    "--file",
    "services_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The catalogue (default: app/data/catalog/services.json).",
)
@click.option(
    "--regions",
    "regions_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Which services each region offers (default: app/data/catalog/regions.json).",
)
def catalog_load(services_file: Path | None, regions_file: Path | None) -> None:
    """Check the catalogue files and load them in one transaction.

    Loading what is already loaded changes nothing; a new version adds, changes and withdraws
    services (withdrawn ones leave every region). A changed file needs a new version.
    """
    from app.domain.catalog.document import CatalogFileError, read_catalog, read_regions
    from app.domain.catalog.services import DEFAULT_REGIONS_FILE, DEFAULT_SERVICES_FILE, LoadResult, load_catalog

    try:
        catalog = read_catalog(services_file or DEFAULT_SERVICES_FILE)
        availability = read_regions(regions_file or DEFAULT_REGIONS_FILE, catalog)
    except CatalogFileError as exc:
        raise click.ClickException(f"{exc}; nothing was loaded") from None

    async def work(context: ServiceContext) -> LoadResult:
        async with context.sessions() as session:
            return await load_catalog(session, Actor.command("ecard catalog load"), catalog, availability)

    click.echo(_run(work).summary())


@ecard_group.command(name="demo")
@click.option("--region", default="510000", show_default=True)
def demo(region: str) -> None:
    """Set up a region, an admin, a transit gate and a card to try the whole loop by hand."""
    from app.db.models import Region
    from app.domain.cards.citizen_id import check_character
    from app.domain.cards.services import issue_card
    from app.domain.operators.services import Role, create_operator
    from app.domain.regions.services import register_region
    from app.domain.verification.disclosure import BusinessType
    from app.domain.verifiers.services import register_organisation, register_terminal

    password = secrets.token_urlsafe(12)
    username = f"admin-{secrets.token_hex(3)}"
    birth_serial = f"{region}19900101{secrets.randbelow(1000):03d}"
    citizen_id = birth_serial + check_character(birth_serial)
    card_number = f"D{secrets.randbelow(10**8):08d}"

    actor = Actor.command("ecard demo")

    async def work(context: ServiceContext) -> dict[str, str]:
        async with context.sessions() as session:
            if await session.get(Region, region) is None:
                await register_region(
                    session, context.pii, actor, region, f"Demo region {region}", key_store=context.key_store
                )
            await create_operator(
                session, actor, username=username, password=password, role=Role.ADMIN, regions=[region]
            )
            organisation = await register_organisation(
                session, actor, name="Demo Metro", business_type=BusinessType.TRANSIT, region=region
            )
            _terminal, api_key = await register_terminal(
                session,
                actor,
                organisation,
                name=f"gate-{secrets.token_hex(2)}",
                purposes=["transit", "general"],
                national=context.settings.crypto_profile == NATIONAL,
            )
            issued = await issue_card(
                session,
                context.pii,
                region=region,
                citizen_id=citizen_id,
                name="张三",
                card_number=card_number,
                code_ttl=context.settings.activation_code_ttl,
                actor=actor,
            )
        await context.directory_changes.announce()
        return {
            "operator username": username,
            "operator password": password,
            "terminal api key (X-Api-Key)": api_key,
            "card number": card_number,
            "activation code": issued.activation_code,
        }

    for label, value in _run(work).items():
        click.echo(f"{label:30} {value}")
    click.echo("A running service picks these up within a second.", err=True)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(ecard_group())
