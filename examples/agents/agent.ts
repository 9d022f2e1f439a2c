/**
 * An agent's side of Writ, with Node's built-in `fetch` only (Node 20 or later): exchange a
 * workload identity (a JWT-SVID) for a task token, mint a second token into the task, end the
 * task, and handle each OAuth error the broker answers. The same agent as agent.py.
 *
 *     tsc --strict --target es2022 --module nodenext --types node --outDir /tmp/agent-ts examples/agents/agent.ts
 *     BROKER=http://127.0.0.1:8080 SVID_FILE=.writ-dev/demo.svid node /tmp/agent-ts/agent.js
 *
 * tests/interop/run.sh compiles and runs it against a real broker, with UNAVAILABLE_TOKEN_FILE
 * naming an ID token of an OIDC issuer that is down, to show the 503 retry.
 */
import { readFileSync } from "node:fs";

const GRANT = "urn:ietf:params:oauth:grant-type:token-exchange";
const JWT_TYPE = "urn:ietf:params:oauth:token-type:jwt";

/** A successful exchange (RFC 8693 §2.2.1), with the task it minted into. */
interface TokenResponse {
  access_token: string;
  issued_token_type: string;
  token_type: string;
  expires_in: number;
  scope: string;
  task_id: string;
}

/** An error answer (RFC 6749 §5.2). */
interface ErrorBody {
  error?: string;
  error_description?: string;
}

/** The broker refused (4xx): retrying the same request gets the same answer. */
class Refused extends Error {
  constructor(
    readonly status: number,
    readonly error: string | undefined,
    readonly description: string | undefined,
  ) {
    super(`${status} ${error}: ${description}`);
  }
}

/** The run went another way than this agent expects: stop with the reason. */
class Exit extends Error {}

function check(ok: boolean, what: unknown): asserts ok {
  if (!ok) throw new Exit(`assertion failed: ${String(what)}`);
}

const sleep = (seconds: number) => new Promise((done) => setTimeout(done, seconds * 1000));

/** POSTs a form; on 503 waits for Retry-After and tries again, at most `attempts` times. */
async function post<T>(
  broker: string,
  path: string,
  form: Record<string, string> = {},
  bearer?: string,
  attempts = 3,
): Promise<T> {
  for (let attempt = 0; attempt < attempts; attempt++) {
    const headers: Record<string, string> = {
      "Content-Type": "application/x-www-form-urlencoded",
    };
    if (bearer) headers["Authorization"] = `Bearer ${bearer}`;
    const r = await fetch(broker + path, {
      method: "POST",
      headers,
      body: new URLSearchParams(form).toString(),
      signal: AbortSignal.timeout(10_000),
    });
    const text = await r.text();
    const body: unknown = JSON.parse(text || "{}");
    if (r.ok) return body as T;
    if (r.status === 503 && attempt + 1 < attempts) {
      // The broker could not decide (store, decision log or an OIDC issuer down):
      // it issued nothing. Wait as told and try again.
      const wait = Number.parseInt(r.headers.get("Retry-After") ?? "1", 10);
      await sleep(Number.isNaN(wait) ? 1 : wait);
      continue;
    }
    const e = body as ErrorBody;
    throw new Refused(r.status, e.error, e.error_description);
  }
  throw new Exit("unreachable");
}

/** RFC 8693: a task token for `scope` at `audience`; with `taskId`, into that task. */
function exchange(
  broker: string,
  svid: string,
  scope: string,
  audience: string,
  purpose?: string,
  taskId?: string,
): Promise<TokenResponse> {
  const form: Record<string, string> = {
    grant_type: GRANT,
    subject_token: svid,
    subject_token_type: JWT_TYPE,
    scope,
    audience,
  };
  if (purpose) form["task_purpose"] = purpose;
  if (taskId) form["task_id"] = taskId;
  return post<TokenResponse>(broker, "/oauth2/token", form);
}

/** Ends the task: every token of it (and of tasks delegated from it) stops working. */
function endTask(broker: string, token: string, taskId: string): Promise<unknown> {
  return post<unknown>(broker, `/v1/tasks/${taskId}/end`, {}, token);
}

/** What an agent does about each refusal. */
function whatToDo(e: Refused): string {
  const advice: Record<string, string> = {
    invalid_request: "fix the request or get a fresh identity token (expired, wrong audience, ...)",
    invalid_scope: "policy does not allow a scope: ask for less, or ask a human",
    invalid_target: "the audience is not an absolute URI or SPIFFE ID",
    invalid_grant: "the task is over (ended, expired, budget spent) or this workload is blocked",
    access_denied: "this token may not do that (e.g. end another task)",
    temporarily_unavailable: "the broker could not decide; it kept answering 503",
  };
  return advice[e.error ?? ""] ?? "unexpected refusal";
}

function env(name: string): string {
  const value = process.env[name];
  if (value === undefined) throw new Exit(`${name} is not set`);
  return value;
}

async function main(): Promise<void> {
  const broker = env("BROKER");
  const svid = readFileSync(env("SVID_FILE"), "utf8").trim();
  const scope = process.env["SCOPE"] ?? "repo:read";
  const api = process.env["AUDIENCE"] ?? "https://api.example.org";

  const first = await exchange(broker, svid, scope, api, "triage issue 42");
  const task = first.task_id;
  console.log(`task ${task}: token for ${first.scope}, ${first.expires_in} s`);
  const second = await exchange(broker, svid, scope, api, undefined, task);
  console.log(`second token in ${second.task_id}`);
  const other = await exchange(broker, svid, scope, api);

  const cases: [string, () => Promise<unknown>][] = [
    ["invalid_request", () => exchange(broker, "not-a-jwt", scope, api)],
    ["invalid_scope", () => exchange(broker, svid, `${scope} repo:admin`, api)],
    ["invalid_target", () => exchange(broker, svid, scope, "not a uri")],
    ["access_denied", () => endTask(broker, other.access_token, task)],
  ];
  for (const [label, call] of cases) {
    try {
      await call();
    } catch (e) {
      if (!(e instanceof Refused)) throw e;
      check(e.error === label, e);
      console.log(`${e.status} ${e.error}: ${whatToDo(e)}`);
      continue;
    }
    throw new Exit(`expected ${label}, got a token`);
  }

  console.log("ended:", JSON.stringify(await endTask(broker, second.access_token, task)));
  try {
    await exchange(broker, svid, scope, api, undefined, task);
    throw new Exit("expected invalid_grant after the end");
  } catch (e) {
    if (!(e instanceof Refused)) throw e;
    check(e.error === "invalid_grant", e);
    console.log(`after the end: ${e.status} ${e.error}: ${whatToDo(e)}`);
  }

  // An identity the broker cannot check now (its OIDC issuer is down): 503, retried.
  const unavailable = process.env["UNAVAILABLE_TOKEN_FILE"];
  if (unavailable) {
    const token = readFileSync(unavailable, "utf8").trim();
    const started = performance.now();
    try {
      await exchange(broker, token, scope, api);
      throw new Exit("expected temporarily_unavailable");
    } catch (e) {
      if (!(e instanceof Refused)) throw e;
      check(e.status === 503 && e.error === "temporarily_unavailable", e);
      const waited = (performance.now() - started) / 1000;
      check(waited >= 2, `did not wait for Retry-After (${waited.toFixed(1)} s)`);
      console.log(`${e.status} ${e.error} after ${waited.toFixed(0)} s of retries: ${whatToDo(e)}`);
    }
  }
}

main().catch((e: unknown) => {
  console.error(e instanceof Error ? e.message : e);
  process.exit(1);
});
