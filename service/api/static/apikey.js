// The API key both pages send: kept in this tab only (sessionStorage, gone when it closes),
// set or cleared (empty) by the page's #api-key form. Loaded before each page's own script.
"use strict";

const API_KEY = "visrec-api-key";

function hasKey() {
  return Boolean(sessionStorage.getItem(API_KEY));
}

// `options` for fetch, with the key's header when there is one (the service may require a key
// for reads, and always does for writes).
function withKey(options = {}) {
  const key = sessionStorage.getItem(API_KEY);
  const headers = { ...(options.headers ?? {}), ...(key ? { "X-API-Key": key } : {}) };
  return { ...options, headers };
}

// Calls `changed` once the form has set or cleared the key.
function onKeyForm(changed) {
  document.getElementById("api-key").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = event.target.elements.key.value.trim();
    if (key) sessionStorage.setItem(API_KEY, key);
    else sessionStorage.removeItem(API_KEY);
    event.target.reset();
    changed();
  });
}
