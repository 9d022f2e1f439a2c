// The resource-server verifier (writ::verify, SPEC §9) against an independent client: the
// example resource server (examples/resource_server.rs) in front of the broker, and proofs
// for its routes made by panva's `dpop` (with `ath`), for a token the broker bound to the
// same key.
import { readFileSync } from 'node:fs'
import * as jose from 'jose'
import * as DPoP from 'dpop'

const BROKER = process.env.BROKER
const RS = process.env.RS
const WORK = process.env.WORK
const KEY = await jose.importPKCS8(readFileSync(`${WORK}/td-key.pem`, 'utf8'), 'ES256')
const KID = readFileSync(`${WORK}/td-kid`, 'utf8')
const API = 'https://api.interop.test'
const ALGS = 'algs="ES256 EdDSA Ed25519 RS256 PS256"'
// The interop broker's `[status] ttl` (setup_td.py).
const STATUS_TTL_MS = 2000

let passed = 0
let failed = 0
async function check(name, fn) {
  try {
    await fn()
    passed++
    console.log(`ok   node: ${name}`)
  } catch (e) {
    failed++
    console.log(`FAIL node: ${name}: ${e?.name}: ${e?.message}`)
  }
}
function assert(cond, msg) {
  if (!cond) throw new Error(msg)
}

async function svid(sub) {
  return new jose.SignJWT({ sub, aud: ['writ'] })
    .setProtectedHeader({ alg: 'ES256', kid: KID, typ: 'JWT' })
    .setIssuedAt()
    .setExpirationTime('5m')
    .sign(KEY)
}

const meta = await (await fetch(`${BROKER}/.well-known/oauth-authorization-server`)).json()

// A token for `repo:read` at the API, bound to `keypair` when given.
async function token(keypair) {
  const headers = { 'content-type': 'application/x-www-form-urlencoded' }
  if (keypair) headers.dpop = await DPoP.generateProof(keypair, meta.token_endpoint, 'POST')
  const res = await fetch(`${BROKER}/oauth2/token`, {
    method: 'POST',
    headers,
    body: new URLSearchParams({
      grant_type: 'urn:ietf:params:oauth:grant-type:token-exchange',
      subject_token: await svid('spiffe://interop.test/agent/verify'),
      subject_token_type: 'urn:ietf:params:oauth:token-type:jwt',
      scope: 'repo:read',
      audience: API,
    }),
  })
  const body = await res.json()
  assert(res.status === 200, JSON.stringify(body))
  assert(body.token_type === (keypair ? 'DPoP' : 'Bearer'), body.token_type)
  return body.access_token
}

// GET /repo at the resource server with `Authorization: <scheme> <token>` and the proofs.
async function get(scheme, accessToken, proofs = []) {
  const headers = new Headers({ authorization: `${scheme} ${accessToken}` })
  for (const p of proofs) headers.append('dpop', p)
  const res = await fetch(`${RS}/repo`, { headers })
  const text = await res.text()
  return { status: res.status, challenge: res.headers.get('www-authenticate') ?? '', body: text ? JSON.parse(text) : null }
}

function refused(r, status, scheme, error) {
  assert(r.status === status, `status ${r.status}, not ${status}: ${r.challenge}`)
  assert(r.challenge.startsWith(`${scheme} error="${error}"`), `challenge ${r.challenge}`)
  if (scheme === 'DPoP') assert(r.challenge.endsWith(ALGS), `algs in ${r.challenge}`)
}

const keypair = await DPoP.generateKeyPair('ES256')
const bound = await token(keypair)
const proof = (kp, tok, htm = 'GET', htu = `${RS}/repo`) => DPoP.generateProof(kp, htu, htm, undefined, tok)

await check('verify: a bound token with a `dpop` proof (ath) is accepted; the handler sees its claims', async () => {
  const r = await get('DPoP', bound, [await proof(keypair, bound)])
  assert(r.status === 200, `status ${r.status}: ${r.challenge}`)
  assert(r.body.binding === 'dpop', JSON.stringify(r.body))
  assert(r.body.cnf.jkt === await DPoP.calculateThumbprint(keypair.publicKey), 'cnf.jkt')
  assert(r.body.subject === 'spiffe://interop.test/agent/verify', r.body.subject)
  assert(JSON.stringify(r.body.scopes) === '["repo:read"]', JSON.stringify(r.body.scopes))
})

await check('verify: the bound token without a proof is refused (invalid_dpop_proof)', async () => {
  refused(await get('DPoP', bound), 401, 'DPoP', 'invalid_dpop_proof')
})

await check("verify: another key's proof is refused (invalid_dpop_proof)", async () => {
  const other = await DPoP.generateKeyPair('ES256')
  refused(await get('DPoP', bound, [await proof(other, bound)]), 401, 'DPoP', 'invalid_dpop_proof')
})

await check('verify: a replayed proof, and a proof for another token (ath), are refused', async () => {
  const p = await proof(keypair, bound)
  assert((await get('DPoP', bound, [p])).status === 200, 'first use')
  refused(await get('DPoP', bound, [p]), 401, 'DPoP', 'invalid_dpop_proof')
  const second = await token(keypair)
  refused(await get('DPoP', bound, [await proof(keypair, second)]), 401, 'DPoP', 'invalid_dpop_proof')
})

await check('verify: a DPoP-bound token presented as Bearer is refused (invalid_token)', async () => {
  refused(await get('Bearer', bound), 401, 'DPoP', 'invalid_token')
  refused(await get('Bearer', bound, [await proof(keypair, bound)]), 401, 'DPoP', 'invalid_token')
})

await check('verify: a bearer token is accepted as Bearer', async () => {
  const r = await get('Bearer', await token(null))
  assert(r.status === 200 && r.body.binding === 'none', `status ${r.status}: ${r.challenge}`)
})

await check('verify: after RFC 7009 revocation the bound token is refused within the status ttl', async () => {
  const t = await token(keypair)
  assert((await get('DPoP', t, [await proof(keypair, t)])).status === 200, 'accepted before')
  const res = await fetch(`${BROKER}/oauth2/revoke`, {
    method: 'POST',
    headers: { 'content-type': 'application/x-www-form-urlencoded' },
    body: new URLSearchParams({ token: t }),
  })
  assert(res.status === 200, `revoke ${res.status}`)
  const start = Date.now()
  let r
  do {
    r = await get('DPoP', t, [await proof(keypair, t)])
    if (r.status !== 200) break
    await new Promise((ok) => setTimeout(ok, 100))
  } while (Date.now() - start < STATUS_TTL_MS + 3000)
  refused(r, 401, 'DPoP', 'invalid_token')
  const took = Date.now() - start
  assert(took <= STATUS_TTL_MS + 2000, `refused after ${took} ms`)
})

console.log(`node verify: ${passed} passed, ${failed} failed`)
process.exit(failed ? 1 : 0)
