import { afterEach, describe, expect, it, vi } from 'vitest'
import { cleanup, render, screen, fireEvent } from '@testing-library/svelte'
import Auth from './Auth.svelte'

// answer mocks fetch: the providers list is empty, any other call gets
// a fresh response from make.
function answer(make) {
  vi.spyOn(globalThis, 'fetch').mockImplementation(async (url) =>
    url === '/v1/auth/providers' ? new Response('{"providers":[]}', { status: 200 }) : make())
}

afterEach(() => {
  cleanup()
  vi.restoreAllMocks()
  localStorage.clear()
})

describe('Auth', () => {
  it('shows the API error of a failed login', async () => {
    answer(() => new Response(JSON.stringify({ error: { code: 'invalid_credentials', message: 'wrong email or password' } }), { status: 401 }))
    render(Auth, { page: 'login', query: new URLSearchParams() })
    await fireEvent.input(screen.getByLabelText('Email'), { target: { value: 'a@example.com' } })
    await fireEvent.input(screen.getByLabelText('Password'), { target: { value: 'nope nope' } })
    await fireEvent.click(screen.getByRole('button', { name: 'Log in' }))
    expect(await screen.findByRole('alert')).toHaveProperty('textContent', 'wrong email or password')
    expect(fetch).toHaveBeenCalledWith('/v1/auth/login', expect.objectContaining({ method: 'POST' }))
    expect(localStorage.getItem('wrenn.token')).toBeNull()
  })

  it('keeps the session after a good login', async () => {
    answer(() => new Response(JSON.stringify({ token: 'h.eyJlbWFpbCI6ImFAZXhhbXBsZS5jb20ifQ.s' }), { status: 200 }))
    render(Auth, { page: 'login', query: new URLSearchParams() })
    await fireEvent.input(screen.getByLabelText('Email'), { target: { value: 'a@example.com' } })
    await fireEvent.input(screen.getByLabelText('Password'), { target: { value: 'correct horse' } })
    await fireEvent.click(screen.getByRole('button', { name: 'Log in' }))
    await vi.waitFor(() => expect(localStorage.getItem('wrenn.token')).toContain('eyJ'))
  })
})

describe('sign-in with GitHub', () => {
  it('offers GitHub when the control plane has it', async () => {
    vi.spyOn(globalThis, 'fetch').mockResolvedValue(new Response(JSON.stringify({ providers: ['github'] }), { status: 200 }))
    render(Auth, { page: 'login', query: new URLSearchParams() })
    const link = await screen.findByRole('link', { name: 'Log in with GitHub' })
    expect(link.getAttribute('href')).toBe('/auth/oauth/github')
  })

  it('shows why a provider sign-in failed', async () => {
    render(Auth, { page: 'auth/github/callback', query: new URLSearchParams('error=email_taken') })
    expect((await screen.findByRole('alert')).textContent).toContain('log in with its password and connect GitHub')
  })
})
