// DPoP and token status lists against independent clients: proofs made by panva's `dpop`
// (and, for the hostile ones, hand-built with `jose`), the thumbprint by `dpop`'s
// calculateThumbprint, and status lists verified by `jose` against /oauth2/jwks and decoded by
// @sd-jwt/jwt-status-list.
import { readFileSync } from 'node:fs'
import * as jose from 'jose'
import * as DPoP from 'dpop'
import { getListFromStatusListJWT } from '@sd-jwt/jwt-status-list'

const BROKER = process.env.BROKER
// The second broker requires DPoP nonces ([dpop] require_nonce = true).
const BROKER_NONCE = process.env.BROKER_PATH
const WORK = process.env.WORK
const KEY = await jose.importPKCS8(readFileSync(`${WORK}/td-key.pem`, 'utf8'), 'ES256')
const KID = readFileSync(`${WORK}/td-kid`, 'utf8')
const ADMIN = readFileSync(`${WORK}/admin-token`, 'utf8')
const API = 'https://api.interop.test'

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

async function metadata(broker) {
  const url = new URL(broker)
  const res = await fetch(`${url.origin}/.well-known/oauth-authorization-server${url.pathname === '/' ? '' : url.pathname}`)
  return res.json()
}

// A token exchange with the given DPoP header (or none); returns status, body, headers.
async function exchange(broker, proof, extra = {}) {
  const body = new URLSearchParams({
    grant_type: 'urn:ietf:params:oauth:grant-type:token-exchange',
    subject_token: await svid('spiffe://interop.test/agent/dpop'),
    subject_token_type: 'urn:ietf:params:oauth:token-type:jwt',
    scope: 'repo:read',
    audience: API,
    ...extra,
  })
  const headers = { 'content-type': 'application/x-www-form-urlencoded' }
  if (proof) headers.dpop = proof
  const res = await fetch(`${broker}/oauth2/token`, { method: 'POST', headers, body })
  return { status: res.status, body: await res.json(), headers: res.headers }
}

function claimsOf(jwt) {
  return JSON.parse(Buffer.from(jwt.split('.')[1], 'base64url').toString())
}

const meta = await metadata(BROKER)
const HTU = meta.token_endpoint
const keypair = await DPoP.generateKeyPair('ES256', { extractable: true })

await check('dpop: metadata lists dpop_signing_alg_values_supported', async () => {
  const algs = meta.dpop_signing_alg_values_supported
  assert(Array.isArray(algs) && algs.includes('ES256') && algs.includes('PS256'), JSON.stringify(algs))
})

let bound
await check('dpop: a proof from `dpop` binds the token; cnf.jkt = calculateThumbprint', async () => {
  const proof = await DPoP.generateProof(keypair, HTU, 'POST')
  const r = await exchange(BROKER, proof)
  assert(r.status === 200, JSON.stringify(r.body))
  assert(r.body.token_type === 'DPoP', `token_type ${r.body.token_type}`)
  const jkt = await DPoP.calculateThumbprint(keypair.publicKey)
  bound = r.body.access_token
  assert(claimsOf(bound).cnf?.jkt === jkt, `cnf ${JSON.stringify(claimsOf(bound).cnf)} != ${jkt}`)
  // jose agrees on the thumbprint of the same key.
  const jwk = await jose.exportJWK(keypair.publicKey)
  assert(await jose.calculateJwkThumbprint(jwk) === jkt, 'jose thumbprint')
})

await check('dpop: Ed25519, RS256 and PS256 keys from `dpop` are accepted', async () => {
  for (const alg of ['Ed25519', 'RS256', 'PS256']) {
    const kp = await DPoP.generateKeyPair(alg)
    const r = await exchange(BROKER, await DPoP.generateProof(kp, HTU, 'POST'))
    assert(r.status === 200, `${alg}: ${JSON.stringify(r.body)}`)
    assert(claimsOf(r.body.access_token).cnf.jkt === await DPoP.calculateThumbprint(kp.publicKey), alg)
  }
})

async function refused(proof, what) {
  const r = await exchange(BROKER, proof)
  assert(r.status === 400 && r.body.error === 'invalid_dpop_proof', `${what}: ${r.status} ${JSON.stringify(r.body)}`)
}

await check('dpop: a replayed proof is refused', async () => {
  const proof = await DPoP.generateProof(keypair, HTU, 'POST')
  const first = await exchange(BROKER, proof)
  assert(first.status === 200, JSON.stringify(first.body))
  await refused(proof, 'replay')
})

await check('dpop: wrong htu, wrong htm are refused', async () => {
  await refused(await DPoP.generateProof(keypair, `${BROKER}/oauth2/introspect`, 'POST'), 'htu')
  await refused(await DPoP.generateProof(keypair, HTU, 'GET'), 'htm')
})

// Hostile proofs the `dpop` library will not make, built with jose.
const publicJwk = await jose.exportJWK(keypair.publicKey)
async function handMade({ header = {}, claims = {}, key = keypair.privateKey, alg = 'ES256' } = {}) {
  return new jose.SignJWT({ jti: crypto.randomUUID(), htm: 'POST', htu: HTU, iat: Math.floor(Date.now() / 1000), ...claims })
    .setProtectedHeader({ typ: 'dpop+jwt', alg, jwk: publicJwk, ...header })
    .sign(key)
}

await check('dpop: jose-made control proof is accepted', async () => {
  const r = await exchange(BROKER, await handMade())
  assert(r.status === 200, JSON.stringify(r.body))
})

await check('dpop: an old iat is refused', async () => {
  await refused(await handMade({ claims: { iat: Math.floor(Date.now() / 1000) - 120 } }), 'old iat')
})

await check('dpop: a private key in jwk is refused', async () => {
  const privateJwk = await jose.exportJWK(keypair.privateKey)
  assert(privateJwk.d, 'the private JWK has d')
  await refused(await handMade({ header: { jwk: privateJwk } }), 'private jwk')
})

await check('dpop: alg none and HS256 are refused', async () => {
  const enc = (o) => Buffer.from(JSON.stringify(o)).toString('base64url')
  const claims = { jti: crypto.randomUUID(), htm: 'POST', htu: HTU, iat: Math.floor(Date.now() / 1000) }
  await refused(`${enc({ typ: 'dpop+jwt', alg: 'none', jwk: publicJwk })}.${enc(claims)}.`, 'alg none')
  const secret = new TextEncoder().encode('0123456789abcdef0123456789abcdef')
  const hs = await new jose.SignJWT(claims)
    .setProtectedHeader({ typ: 'dpop+jwt', alg: 'HS256', jwk: publicJwk })
    .sign(secret)
  await refused(hs, 'HS256')
})

await check('dpop: the nonce challenge is answered and the retry succeeds', async () => {
  const htu = (await metadata(BROKER_NONCE)).token_endpoint
  const first = await exchange(BROKER_NONCE, await DPoP.generateProof(keypair, htu, 'POST'))
  assert(first.status === 400 && first.body.error === 'use_dpop_nonce', JSON.stringify(first.body))
  const nonce = first.headers.get('dpop-nonce')
  assert(nonce, 'DPoP-Nonce header')
  const second = await exchange(BROKER_NONCE, await DPoP.generateProof(keypair, htu, 'POST', nonce))
  assert(second.status === 200, JSON.stringify(second.body))
  assert(second.body.token_type === 'DPoP', second.body.token_type)
})

// Status lists: fetched, verified by jose against the JWKS, decoded by @sd-jwt/jwt-status-list.
const JWKS = jose.createRemoteJWKSet(new URL(meta.jwks_uri))
async function statusOf(token) {
  const { idx, uri } = claimsOf(token).status.status_list
  const res = await fetch(uri)
  assert(res.status === 200, `GET ${uri}: ${res.status}`)
  assert(res.headers.get('content-type') === 'application/statuslist+jwt', res.headers.get('content-type'))
  assert(/max-age=\d+/.test(res.headers.get('cache-control')), res.headers.get('cache-control'))
  const jwt = await res.text()
  const { payload } = await jose.jwtVerify(jwt, JWKS, { typ: 'statuslist+jwt', subject: uri })
  assert(typeof payload.ttl === 'number' && payload.exp > payload.iat, 'ttl, iat, exp')
  return getListFromStatusListJWT(jwt).getStatus(idx)
}

async function fresh() {
  const r = await exchange(BROKER, null)
  assert(r.status === 200, JSON.stringify(r.body))
  return r.body
}

await check('status list: RFC 7009 revocation flips the bit from 0 to 1', async () => {
  const t = await fresh()
  assert(await statusOf(t.access_token) === 0, 'bit 0 before')
  const res = await fetch(`${BROKER}/oauth2/revoke`, {
    method: 'POST',
    headers: { 'content-type': 'application/x-www-form-urlencoded' },
    body: new URLSearchParams({ token: t.access_token }),
  })
  assert(res.status === 200, `revoke ${res.status}`)
  assert(await statusOf(t.access_token) === 1, 'bit 1 after')
})

await check('status list: task end flips the bit of every token of the task', async () => {
  const t = await fresh()
  const more = await exchange(BROKER, null, { task_id: t.task_id })
  assert(more.status === 200, JSON.stringify(more.body))
  assert(await statusOf(t.access_token) === 0 && await statusOf(more.body.access_token) === 0, 'bits 0 before')
  const res = await fetch(`${BROKER}/v1/tasks/${t.task_id}/end`, {
    method: 'POST', headers: { authorization: `Bearer ${t.access_token}` },
  })
  assert(res.status === 200, `end ${res.status}`)
  assert(await statusOf(t.access_token) === 1 && await statusOf(more.body.access_token) === 1, 'bits 1 after')
})

await check('status list: admin jti and task_id revocations flip the bit', async () => {
  for (const selector of ['jti', 'task_id']) {
    const t = await fresh()
    assert(await statusOf(t.access_token) === 0, 'bit 0 before')
    const value = selector === 'jti' ? claimsOf(t.access_token).jti : t.task_id
    const res = await fetch(`${BROKER}/admin/v1/revocations`, {
      method: 'POST',
      headers: { authorization: `Bearer ${ADMIN}`, 'content-type': 'application/json' },
      body: JSON.stringify({ selector: { [selector]: value }, reason: 'interop' }),
    })
    assert(res.status === 200, `admin ${selector}: ${res.status}`)
    assert(await statusOf(t.access_token) === 1, `bit 1 after admin ${selector}`)
  }
})

await check('status list: a DPoP-bound token has a status too; an unknown list is 404', async () => {
  assert(await statusOf(bound) === 0, 'bound token bit 0')
  const res = await fetch(`${BROKER}/oauth2/status/sl_unknown`)
  assert(res.status === 404, `unknown list ${res.status}`)
})

console.log(`node dpop/status: ${passed} passed, ${failed} failed`)
process.exit(failed ? 1 : 0)
