// A real OIDC issuer: oidc-provider on a loopback port, a client-credentials client that gets
// JWT access tokens, and Writ configured with it as an OIDC issuer (discovery + JWKS). Its
// tokens are exchanged at Writ; a signing key rotation at the issuer is followed.
import Provider from 'oidc-provider'
import * as oauth from 'oauth4webapi'
import * as jose from 'jose'

const BROKER = process.env.BROKER
const port = Number(process.env.OP_PORT)
const issuer = `http://127.0.0.1:${port}`
const insecure = { [oauth.allowInsecureRequests]: true }

async function key(kid) {
  const { privateKey } = await jose.generateKeyPair('RS256', { extractable: true })
  return { ...(await jose.exportJWK(privateKey)), kid, alg: 'RS256', use: 'sig' }
}

function start(keys) {
  const provider = new Provider(issuer, {
    clients: [{ client_id: 'agent', client_secret: 'agent-secret', grant_types: ['client_credentials'], redirect_uris: [], response_types: [] }],
    jwks: { keys },
    features: {
      clientCredentials: { enabled: true },
      resourceIndicators: {
        enabled: true,
        defaultResource: () => 'https://writ.interop',
        getResourceServerInfo: () => ({ scope: 'api', audience: 'writ', accessTokenFormat: 'jwt', jwt: { sign: { alg: 'RS256' } } }),
        useGrantedResource: () => true,
      },
    },
  })
  return new Promise((resolve) => {
    const server = provider.listen(port, '127.0.0.1', () => resolve(server))
  })
}

async function issuerToken() {
  const as = await oauth.processDiscoveryResponse(new URL(issuer), await oauth.discoveryRequest(new URL(issuer), { algorithm: 'oidc', ...insecure }))
  const client = { client_id: 'agent' }
  const res = await oauth.clientCredentialsGrantRequest(as, client, oauth.ClientSecretBasic('agent-secret'), { scope: 'api' }, insecure)
  return (await oauth.processClientCredentialsResponse(as, client, res)).access_token
}

async function exchange(subjectToken, scope = 'deploy') {
  const res = await fetch(`${BROKER}/oauth2/token`, {
    method: 'POST',
    headers: { 'content-type': 'application/x-www-form-urlencoded' },
    body: new URLSearchParams({
      grant_type: 'urn:ietf:params:oauth:grant-type:token-exchange',
      subject_token: subjectToken,
      subject_token_type: 'urn:ietf:params:oauth:token-type:jwt',
      scope,
      audience: 'https://api.interop.test',
    }),
  })
  return { status: res.status, body: await res.json() }
}

let passed = 0
let failed = 0
async function check(name, fn) {
  try {
    await fn()
    passed++
    console.log(`ok   oidc-provider: ${name}`)
  } catch (e) {
    failed++
    console.log(`FAIL oidc-provider: ${name}: ${e?.message}`)
  }
}
function assert(cond, msg) {
  if (!cond) throw new Error(msg)
}

const k1 = await key('k1')
let server = await start([k1])

await check('a JWT access token of a real OIDC issuer is exchanged (discovery + JWKS)', async () => {
  const t = await issuerToken()
  assert(jose.decodeProtectedHeader(t).kid === 'k1', 'signed by k1')
  const { status, body } = await exchange(t)
  assert(status === 200, JSON.stringify(body))
  const claims = jose.decodeJwt(body.access_token)
  assert(claims.sub === `${issuer}#agent`, claims.sub)
})

await check('policy still decides: a scope the issuer subject is not granted is invalid_scope', async () => {
  const { status, body } = await exchange(await issuerToken(), 'repo:read')
  assert(status === 400 && body.error === 'invalid_scope', JSON.stringify(body))
})

await check('the issuer rotates to a new signing key; Writ follows (refetch on unknown kid)', async () => {
  await new Promise((r) => server.close(r))
  const k2 = await key('k2')
  server = await start([k2, k1])
  const t = await issuerToken()
  assert(jose.decodeProtectedHeader(t).kid === 'k2', 'signed by k2')
  // Writ refetches an issuer's JWKS at most every 10 s; the first tries may be refused.
  const deadline = Date.now() + 20000
  for (;;) {
    const { status, body } = await exchange(t)
    if (status === 200) break
    assert(status === 400 && body.error === 'invalid_request', JSON.stringify(body))
    assert(Date.now() < deadline, 'new key not followed within 20 s')
    await new Promise((r) => setTimeout(r, 500))
  }
})

await check('a token from an issuer Writ does not trust is refused', async () => {
  const { privateKey } = await jose.generateKeyPair('RS256')
  const t = await new jose.SignJWT({ client_id: 'agent' })
    .setProtectedHeader({ alg: 'RS256', kid: 'k1', typ: 'at+jwt' })
    .setIssuer('http://127.0.0.1:1').setSubject('agent').setAudience('writ').setIssuedAt().setExpirationTime('5m')
    .sign(privateKey)
  const { status, body } = await exchange(t)
  assert(status === 400 && body.error === 'invalid_request', JSON.stringify(body))
})

await new Promise((r) => server.close(r))
console.log(`${passed} passed, ${failed} failed`)
process.exit(failed ? 1 : 0)
