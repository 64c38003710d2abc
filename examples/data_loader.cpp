// Resolving a small social graph (users, their friends, the friends' names) two ways: one fetch per
// user looked up, and a microbatch::DataLoader, which makes one batched fetch per level and fetches
// each user once. Prints both fetch counts; exits 1 if they are not what the graph implies.
#include <microbatch/microbatch.hpp>

#include <atomic>
#include <cstdio>
#include <map>
#include <set>
#include <span>
#include <string>
#include <vector>

namespace {

struct User {
  int id;
  std::string name;
  std::vector<int> friends;
};

// The "database": in real life one `SELECT ... WHERE id = ANY($1)` per call.
const std::map<int, User> database = {
    {1, {1, "Ada", {2, 3, 4}}}, {2, {2, "Brian", {1, 5}}}, {3, {3, "Chen", {1, 4, 6}}}, {4, {4, "Dana", {1, 3}}},
    {5, {5, "Emil", {2}}},      {6, {6, "Fay", {3, 7}}},   {7, {7, "Gus", {6}}},
};

std::atomic<int> fetches{0};       // calls to the database
std::atomic<int> users_fetched{0}; // rows read

std::vector<User> fetch_users(std::span<int> ids) {
  fetches.fetch_add(1);
  users_fetched.fetch_add(static_cast<int>(ids.size()));
  std::vector<User> users;
  for (int id : ids)
    if (auto found = database.find(id); found != database.end()) users.push_back(found->second);
  return users; // a missing id would end its load with microbatch::no_result
}

std::string names(const std::vector<User>& users) {
  std::string joined;
  for (const User& user : users)
    joined += (joined.empty() ? "" : ", ") + user.name;
  return joined;
}

} // namespace

int main() {
  const std::vector<int> roots = {1, 2, 3}; // the users whose friends we show

  // 1. One fetch per user looked up.
  std::map<int, std::string> naive_result;
  for (int id : roots) {
    User user = fetch_users(std::span<int>(&id, 1)).at(0);
    std::vector<User> friends;
    for (int friend_id : user.friends)
      friends.push_back(fetch_users(std::span<int>(&friend_id, 1)).at(0));
    naive_result[id] = user.name + ": " + names(friends);
  }
  const int naive_fetches = fetches.exchange(0);
  users_fetched = 0;

  // 2. DataLoader. Only flush() dispatches here (size and delay 0), so each level is exactly one
  // batch; in a server the batch delay (e.g. 1 ms) would close the window instead.
  microbatch::DataLoader loader(
      fetch_users, &User::id,
      microbatch::DataLoaderOptions{.batching = {.max_batch_size = 0, .max_batch_delay = std::chrono::nanoseconds(0)}});
  // Level 1: the users themselves.
  auto user_futures = loader.load_many(roots);
  loader.flush();
  // Level 2: every friend of every user; users already loaded are answered from the cache.
  std::vector<std::vector<std::shared_future<User>>> friend_futures;
  for (auto& user : user_futures)
    friend_futures.push_back(loader.load_many(user.get().friends));
  loader.flush();
  std::map<int, std::string> loader_result;
  for (std::size_t i = 0; i < roots.size(); ++i) {
    std::vector<User> friends;
    for (auto& friend_future : friend_futures[i])
      friends.push_back(friend_future.get());
    loader_result[roots[i]] = user_futures[i].get().name + ": " + names(friends);
    std::printf("%s\n", loader_result[roots[i]].c_str());
  }
  const int loader_fetches = fetches.load();
  const auto stats = loader.stats();

  // What the graph implies: one fetch per lookup naively; one per level, each user once, with DataLoader.
  std::set<int> distinct(roots.begin(), roots.end());
  std::size_t lookups = roots.size();
  for (int id : roots) {
    lookups += database.at(id).friends.size();
    distinct.insert(database.at(id).friends.begin(), database.at(id).friends.end());
  }
  std::printf("one fetch per user: %d fetches\n", naive_fetches);
  std::printf("DataLoader:         %d fetches for 2 levels, %d users fetched, %llu loads from the cache\n",
              loader_fetches, users_fetched.load(), static_cast<unsigned long long>(stats.hits));

  const bool as_expected = naive_fetches == static_cast<int>(lookups) && loader_fetches == 2 &&
                           users_fetched.load() == static_cast<int>(distinct.size()) &&
                           stats.hits == lookups - distinct.size() && loader_result == naive_result;
  if (!as_expected) {
    std::printf("UNEXPECTED: wanted %zu fetches one by one; 2 fetches, %zu users and %zu cache hits with DataLoader\n",
                lookups, distinct.size(), lookups - distinct.size());
    return 1;
  }
  return 0;
}
