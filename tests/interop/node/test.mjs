// Writ against independent JavaScript clients: oauth4webapi (discovery with the RFC 8414
// issuer check, token exchange, introspection, revocation, and validateJwtAccessToken as an
// RFC 9068 resource-server oracle) and jose (remote JWKS, jwtVerify with typ at+jwt).
import { readFileSync } from 'node:fs'
import * as oauth from 'oauth4webapi'
import * as jose from 'jose'

const BROKER = process.env.BROKER
const WORK = process.env.WORK
const KEY = await jose.importPKCS8(readFileSync(`${WORK}/td-key.pem`, 'utf8'), 'ES256')
const KID = readFileSync(`${WORK}/td-kid`, 'utf8')
const ADMIN = readFileSync(`${WORK}/admin-token`, 'utf8')
const API = 'https://api.interop.test'
const insecure = { [oauth.allowInsecureRequests]: true }
// Writ's introspection callers authenticate with a bearer credential (an admin token or a
// resource server's SVID): a ClientAuth that sets it.
const bearer = (credential) => (_as, _client, _body, headers) => {
  headers.set('authorization', `Bearer ${credential}`)
}

let passed = 0
let failed = 0
async function check(name, fn) {
  try {
    await fn()
    passed++
    console.log(`ok   node: ${name}`)
  } catch (e) {
    failed++
    console.log(`FAIL node: ${name}: ${e?.name}: ${e?.message} ${e?.cause ? JSON.stringify(e.cause) : ''}`)
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

const issuer = new URL(BROKER)
let as
const client = { client_id: 'interop-agent' }

await check('discovery: RFC 8414 metadata whose issuer matches the URL', async () => {
  const res = await oauth.discoveryRequest(issuer, { algorithm: 'oauth2', ...insecure })
  as = await oauth.processDiscoveryResponse(issuer, res)
  assert(as.token_endpoint === `${BROKER}/oauth2/token`, 'token_endpoint')
  assert(as.jwks_uri && as.introspection_endpoint && as.revocation_endpoint, 'endpoints')
})

let token, taskId
await check('token exchange with genericTokenEndpointRequest', async () => {
  const res = await oauth.genericTokenEndpointRequest(as, client, oauth.None(),
    'urn:ietf:params:oauth:grant-type:token-exchange', {
      subject_token: await svid('spiffe://interop.test/agent/node'),
      subject_token_type: 'urn:ietf:params:oauth:token-type:jwt',
      scope: 'repo:read',
      audience: API,
    }, insecure)
  const body = await oauth.processGenericTokenEndpointResponse(as, client, res)
  assert(body.token_type === 'bearer', `token_type ${body.token_type}`)
  assert(body.issued_token_type === 'urn:ietf:params:oauth:token-type:access_token', 'issued_token_type')
  token = body.access_token
  taskId = body.task_id
})

await check('validateJwtAccessToken accepts the task token (RFC 9068)', async () => {
  const request = new Request(`${API}/repos`, { headers: { authorization: `Bearer ${token}` } })
  const claims = await oauth.validateJwtAccessToken(as, request, API, insecure)
  assert(claims.txn === taskId, 'txn')
  assert(claims.client_id === 'spiffe://interop.test/agent/node', 'client_id')
})

await check('jose: createRemoteJWKSet + jwtVerify({typ: "at+jwt"})', async () => {
  const JWKS = jose.createRemoteJWKSet(new URL(as.jwks_uri))
  const { payload, protectedHeader } = await jose.jwtVerify(token, JWKS, { typ: 'at+jwt', issuer: BROKER, audience: API })
  assert(protectedHeader.typ === 'at+jwt' && payload.scope === 'repo:read', 'claims')
  let refused = false
  try {
    await jose.jwtVerify(token, JWKS, { typ: 'at+jwt', issuer: BROKER, audience: 'https://other.example' })
  } catch {
    refused = true
  }
  assert(refused, 'wrong audience accepted')
})

await check('introspection with a resource server SVID as credential: active', async () => {
  const res = await oauth.introspectionRequest(as, client, bearer(await svid('spiffe://interop.test/resource/api')), token, insecure)
  const body = await oauth.processIntrospectionResponse(as, client, res)
  assert(body.active === true && body.txn === taskId && body.token_type === 'Bearer', JSON.stringify(body))
})

await check('introspection with the admin token: active', async () => {
  const res = await oauth.introspectionRequest(as, client, bearer(ADMIN), token, insecure)
  const body = await oauth.processIntrospectionResponse(as, client, res)
  assert(body.active === true && body.txn === taskId, JSON.stringify(body))
})

await check('revocation (RFC 7009), then introspection answers exactly {active: false}', async () => {
  const res = await oauth.revocationRequest(as, client, oauth.None(), token, insecure)
  await oauth.processRevocationResponse(res)
  const ires = await oauth.introspectionRequest(as, client, bearer(ADMIN), token, insecure)
  const body = await oauth.processIntrospectionResponse(as, client, ires)
  assert(body.active === false && Object.keys(body).length === 1, JSON.stringify(body))
})

await check('a token from another issuer fails validateJwtAccessToken', async () => {
  const { privateKey } = await jose.generateKeyPair('ES256')
  const forged = await new jose.SignJWT({ client_id: 'x', scope: 'repo:read', jti: 'j' })
    .setProtectedHeader({ alg: 'ES256', typ: 'at+jwt', kid: 'nope' })
    .setIssuer(BROKER).setSubject('x').setAudience(API).setIssuedAt().setExpirationTime('5m')
    .sign(privateKey)
  const request = new Request(`${API}/repos`, { headers: { authorization: `Bearer ${forged}` } })
  let refused = false
  try {
    await oauth.validateJwtAccessToken(as, request, API, insecure)
  } catch {
    refused = true
  }
  assert(refused, 'forged token accepted')
})

await check('discovery of an issuer with a path (RFC 8414 §3.1), then an exchange there', async () => {
  const pathIssuer = new URL(process.env.BROKER_PATH)
  assert(pathIssuer.pathname === '/writ', `BROKER_PATH ${pathIssuer}`)
  const res = await oauth.discoveryRequest(pathIssuer, { algorithm: 'oauth2', ...insecure })
  const pas = await oauth.processDiscoveryResponse(pathIssuer, res)
  assert(pas.token_endpoint === `${process.env.BROKER_PATH}/oauth2/token`, `token_endpoint ${pas.token_endpoint}`)
  assert(!('response_types_supported' in pas), 'empty response_types_supported')
  assert(Array.isArray(pas.scopes_supported) && pas.scopes_supported.includes('repo:read'), 'scopes_supported')
  const tres = await oauth.genericTokenEndpointRequest(pas, client, oauth.None(),
    'urn:ietf:params:oauth:grant-type:token-exchange', {
      subject_token: await svid('spiffe://interop.test/agent/node'),
      subject_token_type: 'urn:ietf:params:oauth:token-type:jwt',
      scope: 'repo:read',
      audience: API,
    }, insecure)
  const body = await oauth.processGenericTokenEndpointResponse(pas, client, tres)
  const request = new Request(`${API}/repos`, { headers: { authorization: `Bearer ${body.access_token}` } })
  const claims = await oauth.validateJwtAccessToken(pas, request, API, insecure)
  assert(claims.iss === process.env.BROKER_PATH, `iss ${claims.iss}`)
  const rres = await oauth.revocationRequest(pas, client, oauth.None(), body.access_token, insecure)
  await oauth.processRevocationResponse(rres)
})

await check('delegation (RFC 8693 actor_token): two hops, act nested with the current actor outermost', async () => {
  const EXCHANGE = 'urn:ietf:params:oauth:grant-type:token-exchange'
  const AT = 'urn:ietf:params:oauth:token-type:access_token'
  const JWT = 'urn:ietf:params:oauth:token-type:jwt'
  const owner = 'spiffe://interop.test/agent/node'
  const sub1 = 'spiffe://interop.test/agent/sub/one'
  const sub2 = 'spiffe://interop.test/agent/sub/two'
  const exchange = async (params) => oauth.processGenericTokenEndpointResponse(as, client,
    await oauth.genericTokenEndpointRequest(as, client, oauth.None(), EXCHANGE, params, insecure))
  const root = await exchange({ subject_token: await svid(owner), subject_token_type: JWT, scope: 'repo:read', audience: API })
  // Step 1: the owner mints a grant for the first sub-agent into its task.
  const grant1 = await exchange({ subject_token: await svid(owner), subject_token_type: JWT, scope: 'repo:read',
    audience: sub1, task_id: root.task_id })
  // Without its own identity as actor_token the grant buys nothing.
  let error
  try {
    await exchange({ subject_token: grant1.access_token, subject_token_type: AT, scope: 'repo:read', audience: API })
  } catch (e) {
    error = e
  }
  assert(error?.error === 'invalid_request', `no actor_token: ${error?.error}`)
  // Step 2: the sub-agent exchanges the grant with its own JWT-SVID.
  const child = await exchange({ subject_token: grant1.access_token, subject_token_type: AT,
    actor_token: await svid(sub1), actor_token_type: JWT, scope: 'repo:read', audience: API })
  const JWKS = jose.createRemoteJWKSet(new URL(as.jwks_uri))
  const { payload: c1 } = await jose.jwtVerify(child.access_token, JWKS, { typ: 'at+jwt', issuer: BROKER, audience: API })
  assert(c1.sub === owner && c1.client_id === sub1, `sub ${c1.sub} client_id ${c1.client_id}`)
  assert(JSON.stringify(c1.act) === JSON.stringify({ sub: sub1 }), `act ${JSON.stringify(c1.act)}`)
  assert(c1.txn !== root.task_id, 'the child is a task of its own')
  // The first sub-agent hands on to a second: its grant into its own task, exchanged by sub2.
  const grant2 = await exchange({ subject_token: await svid(sub1), subject_token_type: JWT, scope: 'repo:read',
    audience: sub2, task_id: c1.txn })
  const grandchild = await exchange({ subject_token: grant2.access_token, subject_token_type: AT,
    actor_token: await svid(sub2), actor_token_type: JWT, scope: 'repo:read', audience: API })
  const { payload: c2 } = await jose.jwtVerify(grandchild.access_token, JWKS, { typ: 'at+jwt', issuer: BROKER, audience: API })
  assert(c2.sub === owner && c2.client_id === sub2, `sub ${c2.sub} client_id ${c2.client_id}`)
  assert(JSON.stringify(c2.act) === JSON.stringify({ sub: sub2, act: { sub: sub1 } }), `act ${JSON.stringify(c2.act)}`)
  const ires = await oauth.introspectionRequest(as, client, bearer(ADMIN), grandchild.access_token, insecure)
  const body = await oauth.processIntrospectionResponse(as, client, ires)
  assert(body.active === true && body.act?.act?.sub === sub1, JSON.stringify(body))
  // Revoking the first grant (RFC 7009) ends the tasks delegated from it, at any depth.
  await oauth.processRevocationResponse(await oauth.revocationRequest(as, client, oauth.None(), grant1.access_token, insecure))
  const gone = await oauth.processIntrospectionResponse(as, client,
    await oauth.introspectionRequest(as, client, bearer(ADMIN), grandchild.access_token, insecure))
  assert(gone.active === false, JSON.stringify(gone))
})

console.log(`${passed} passed, ${failed} failed`)
process.exit(failed ? 1 : 0)
