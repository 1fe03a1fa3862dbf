// Conversations kept in the browser's IndexedDB, so they survive a reload and never leave the
// machine. A conversation: {id, title, updated, settings, messages: [{role, content, stats?}]}.

const DB = "llmasos-console";
const STORE = "conversations";

let opened = null;

function db() {
  opened ??= new Promise((resolve, reject) => {
    const request = indexedDB.open(DB, 1);
    request.onupgradeneeded = () => request.result.createObjectStore(STORE, { keyPath: "id" });
    request.onsuccess = () => resolve(request.result);
    request.onerror = () => reject(request.error);
  });
  return opened;
}

async function run(mode, work) {
  const transaction = (await db()).transaction(STORE, mode);
  const request = work(transaction.objectStore(STORE));
  return new Promise((resolve, reject) => {
    transaction.oncomplete = () => resolve(request.result);
    transaction.onerror = () => reject(transaction.error);
  });
}

export async function listConversations() {
  const all = await run("readonly", (store) => store.getAll());
  return all.sort((a, b) => b.updated - a.updated);
}

export function saveConversation(conversation) {
  conversation.updated = Date.now();
  // a structured clone of plain data: no DOM nodes or functions may be in it
  return run("readwrite", (store) => store.put(JSON.parse(JSON.stringify(conversation))));
}

export function deleteConversation(id) {
  return run("readwrite", (store) => store.delete(id));
}

export function newConversation(settings) {
  // not crypto.randomUUID: it exists only in secure contexts, and a server on the LAN is plain http
  const id = `${Date.now().toString(36)}-${Math.random().toString(36).slice(2)}`;
  return { id, title: "New chat", updated: Date.now(), settings, messages: [] };
}
