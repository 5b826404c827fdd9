import { afterEach, describe, expect, it, vi } from 'vitest'
import { cleanup, render, screen, fireEvent } from '@testing-library/svelte'
import Account from './Account.svelte'

afterEach(() => {
  cleanup()
  vi.restoreAllMocks()
  localStorage.clear()
})

function answers(routes) {
  return vi.spyOn(globalThis, 'fetch').mockImplementation(async (url, init) => {
    const key = `${(init && init.method) || 'GET'} ${url}`
    const body = routes[key]
    if (body === undefined) return new Response('{"error":{"code":"not_found","message":"no route"}}', { status: 404 })
    return body === null ? new Response(null, { status: 204 }) : new Response(JSON.stringify(body), { status: 200 })
  })
}

describe('Account', () => {
  it('offers GitHub and deletes the account once the email is typed', async () => {
    const fetch = answers({
      'GET /v1/me': { email: 'a@example.com', name: 'A', has_password: true, providers: [] },
      'GET /v1/auth/providers': { providers: ['github'] },
      'DELETE /v1/me': null,
    })
    render(Account)
    expect(await screen.findByRole('button', { name: 'Connect GitHub' })).toBeTruthy()
    const del = screen.getByRole('button', { name: 'Delete account' })
    expect(del.disabled).toBe(true)
    await fireEvent.input(screen.getByLabelText('Email'), { target: { value: 'A@example.com' } })
    expect(del.disabled).toBe(false)
    await fireEvent.click(del)
    await vi.waitFor(() => expect(fetch).toHaveBeenCalledWith('/v1/me', expect.objectContaining({ method: 'DELETE', body: JSON.stringify({ confirmation: 'A@example.com' }) })))
  })

  it('lets a connected provider be disconnected', async () => {
    answers({
      'GET /v1/me': { email: 'a@example.com', name: 'A', has_password: false, providers: ['github'] },
      'GET /v1/auth/providers': { providers: ['github'] },
    })
    render(Account)
    expect(await screen.findByRole('button', { name: 'Disconnect GitHub' })).toBeTruthy()
    expect(screen.getByText('No password set')).toBeTruthy()
  })
})
